"""What the prefill and decode services share: their common config fields (`ModelServiceConfig`) and flags,
their checks, and how each builds and compiles its engine. Both services import this module; neither imports
the other.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from qwenpd import limits as limits_mod
from qwenpd.engine.device import DEVICE_KINDS, parse_cores
from qwenpd.engine.config import ModelConfig
from qwenpd.engine.engine import Engine
from qwenpd.engine.kv_cache import DEFAULT_PAGE_SIZE, KVCacheSize, check_kv_cache_size
from qwenpd.engine.sharding import ShardPlan
from qwenpd.limits import Limits
from qwenpd.security import Security
from qwenpd.service_config import (DEFAULT_GRACE_S, DTYPE_CHOICES, add_server_args, check_address, check_server,
                                   parse_kv_cache_size)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelServiceConfig:
    """What the prefill and decode services are both started with (each subclass adds its own fields).

    model_dir: HF-format checkpoint (prefill and decode must load the same model: checkpoints of another are
    refused). cache: cache store address. listen: HOST:PORT (port 0 = any free port). device: torch device of the
    engine; neuron_cores: NeuronCores visible to this process (e.g. '0-3'). kv_cache_bytes: size of the paged KV
    cache: bytes (int), or a fraction in (0, 1] (float) of the device memory free once the weights are loaded (None
    = grows on demand); page_size: tokens per KV page (None = the service's default). compile:
    torch.compile every bucket at start (needs kv_cache_bytes); compile_cache: a directory that keeps compiled
    graphs across restarts; whole_graphs: one graph per bucket on CPU too (default there: one region per layer
    kind, shared by its layers: several times faster to warm up, a decode step ~12% slower). max_queue: requests
    that may wait. threads: torch CPU threads. default_max_tokens: max_tokens when a request leaves it out (capped
    at limits.max_new_tokens). grace_s: drain time on SIGTERM. warmup: run one tiny request at start. tp:
    tensor-parallel degree (the service starts and supervises its tp - 1 other ranks; the device is split one per
    rank). limits: what one request may ask for. security: TLS and bearer token of this server and of its
    cache-store connection. metrics_port: Prometheus /metrics (0 = off)."""

    model_dir: str
    cache: str
    listen: str = "127.0.0.1:0"
    dtype: str = "auto"
    device: str = "cpu"
    neuron_cores: str | None = None
    kv_cache_bytes: KVCacheSize | None = None
    page_size: int | None = None
    compile: bool = False
    compile_cache: str | None = None
    whole_graphs: bool = False
    max_queue: int = 64
    threads: int | None = None
    default_max_tokens: int = 256
    grace_s: float = DEFAULT_GRACE_S
    warmup: bool = True
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0
    tp: int = 1

    def __post_init__(self) -> None:
        check_model_service(self)

    def engine_kwargs(self) -> dict:
        """Engine(...) keyword arguments of this service."""
        return dict(dtype=self.dtype, threads=self.threads, device=self.device, kv_cache_bytes=self.kv_cache_bytes,
                    page_size=self.page_size, tp=self.tp)


def add_model_service_args(p: argparse.ArgumentParser, d: argparse.Namespace) -> None:
    """The flags prefill and decode share (defaults from their config class `d`)."""
    p.add_argument("--model", required=True, dest="model_dir", help="checkpoint directory")
    p.add_argument("--cache", required=True, help="cache store address HOST:PORT")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES)
    p.add_argument("--device", default=d.device, help=f"torch device: cpu | cuda[:N] | neuron (default {d.device})")
    p.add_argument("--neuron-cores", default=d.neuron_cores, metavar="LIST",
                   help="NeuronCores this process may use, e.g. 0-3 (sets NEURON_RT_VISIBLE_CORES)")
    p.add_argument("--kv-cache-bytes", type=parse_kv_cache_size, default=d.kv_cache_bytes, metavar="SIZE",
                   help="paged KV cache size: bytes (e.g. 8GiB) or a fraction of the device memory free once the "
                        "weights are loaded (e.g. 0.9 or 90%%) (default: grows on demand)")
    p.add_argument("--page-size", type=int, default=d.page_size,
                   help=f"tokens per KV page; prefill: a divisor of --block-size (default gcd({DEFAULT_PAGE_SIZE}, "
                        f"block size)), decode: default {DEFAULT_PAGE_SIZE}")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prefill chunk / decode step over static buckets at start (needs "
                        "--kv-cache-bytes)")
    p.add_argument("--compile-cache", default=d.compile_cache, metavar="DIR",
                   help="keep compiled graphs here across restarts")
    p.add_argument("--whole-graphs", action="store_true",
                   help="with --compile on CPU: one graph per bucket instead of one region per layer kind (slower "
                        "warm-up, faster steps; neuron and CUDA always compile whole graphs)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests that may wait (default {d.max_queue})")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (per rank)")
    p.add_argument("--tp", type=int, default=d.tp,
                   help=f"tensor-parallel degree: ranks this service starts and shards the model over (default {d.tp})")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    add_server_args(p, d)
    limits_mod.add_args(p)


def check_model_service(cfg: ModelServiceConfig) -> None:
    """The checks a model-serving config (prefill or decode) shares; ValueError naming the field. Caps
    `cfg.default_max_tokens` at the limits' max_new_tokens."""
    if not (Path(cfg.model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir {cfg.model_dir!r} has no config.json")
    check_server(cfg.listen, cfg.grace_s, cfg.metrics_port)
    check_address("cache", cfg.cache)
    if cfg.dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {cfg.dtype!r}")
    if cfg.device.split(":", 1)[0] not in DEVICE_KINDS:
        raise ValueError(f"device must be one of {DEVICE_KINDS}, got {cfg.device!r}")
    if cfg.neuron_cores is not None:
        parse_cores(cfg.neuron_cores)
    check_kv_cache_size(cfg.kv_cache_bytes)
    if cfg.page_size is not None and cfg.page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {cfg.page_size}")
    if cfg.compile and cfg.kv_cache_bytes is None:
        raise ValueError("--compile needs a fixed-size KV cache: give --kv-cache-bytes")
    if cfg.max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {cfg.max_queue}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    check_tp(cfg.model_dir, cfg.tp)
    if cfg.default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1, got {cfg.default_max_tokens}")
    cfg.default_max_tokens = min(cfg.default_max_tokens, cfg.limits.max_new_tokens)


def check_tp(model_dir: str, tp: int) -> None:
    """ValueError unless `tp` shards the model in `model_dir` (heads, channels and vocabulary divide)."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if tp > 1:
        ShardPlan(ModelConfig.from_pretrained(model_dir), tp, 0)  # ShardingError (a ValueError) names what misfits


_lost: list[str] = []


def rank_lost() -> str | None:
    """Why this process's tensor-parallel group broke (a rank died), or None."""
    return _lost[0] if _lost else None


def _stop_on_rank_loss(reason: str) -> None:
    """A rank died: stop serving (health NOT_SERVING, drain: in-flight calls fail UNAVAILABLE and clients
    resume elsewhere), then exit non-zero so a supervisor restarts the whole group."""
    _lost.append(reason)
    log.error("%s: shutting the service down", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def build_engine(cfg: ModelServiceConfig, chunk_size: int, max_batch: int, graphs: tuple[str, ...]) -> Engine:
    """The service's engine on its device; when cfg.compile, the graphs it runs (`graphs`: "prefill", "decode")
    compiled over every bucket (warm-up time logged)."""
    engine = Engine(cfg.model_dir, **cfg.engine_kwargs())
    if engine.group is not None:
        engine.group.on_lost = _stop_on_rank_loss
    if cfg.kv_cache_bytes is not None:
        cache = engine.kv_cache
        log.info("KV cache: %d pages of %d tokens, %.1f MiB (--kv-cache-bytes %s)", cache.num_pages,
                 cache.page_size, cache.num_bytes / (1 << 20), cfg.kv_cache_bytes)
    if cfg.compile:
        buckets = engine.default_buckets(chunk_size, max_batch)
        seconds = engine.compile(buckets, max_batch, cache_dir=cfg.compile_cache, graphs=graphs,
                                 regional=False if cfg.whole_graphs else None)
        log.info("compiled %d %s graphs (%s) in %.1f s", buckets.count(graphs), "+".join(graphs), buckets, seconds)
    return engine
