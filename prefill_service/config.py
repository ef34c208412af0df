"""PrefillConfig: everything the prefill service is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from qwenpd.cache_store.prefix import PrefixPolicy
from qwenpd.cache_store.config import parse_bytes
from qwenpd.engine.device import DEVICE_KINDS, parse_cores
from qwenpd.engine.kv_cache import DEFAULT_PAGE_SIZE
from qwenpd import limits as limits_mod
from qwenpd import security as security_mod
from qwenpd.limits import Limits
from qwenpd.security import Security

DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def check_model_service(cfg) -> None:
    """The checks a model-serving config (prefill or decode) shares: checkpoint, addresses, dtype, queue,
    threads, default max_tokens and grace; ValueError naming the field."""
    if not (Path(cfg.model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir {cfg.model_dir!r} has no config.json")
    split_address(cfg.listen)
    split_address(cfg.cache)
    if cfg.dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {cfg.dtype!r}")
    if cfg.max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {cfg.max_queue}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1, got {cfg.default_max_tokens}")
    if cfg.grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {cfg.grace_s}")
    if cfg.device.split(":", 1)[0] not in DEVICE_KINDS:
        raise ValueError(f"device must be one of {DEVICE_KINDS}, got {cfg.device!r}")
    if cfg.neuron_cores is not None:
        parse_cores(cfg.neuron_cores)
    if cfg.kv_cache_bytes is not None and cfg.kv_cache_bytes < 1:
        raise ValueError(f"kv_cache_bytes must be positive, got {cfg.kv_cache_bytes}")
    if cfg.page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {cfg.page_size}")
    if cfg.compile and cfg.kv_cache_bytes is None:
        raise ValueError("--compile needs a fixed-size KV cache: give --kv-cache-bytes")


@dataclass(slots=True)
class PrefillConfig:
    """model_dir: HF-format checkpoint. listen: HOST:PORT (port 0 = any free port). cache: cache store address.
    device: torch device of the engine; neuron_cores: NeuronCores visible to this process (e.g. '0-3').
    kv_cache_bytes: size of the paged KV cache (None = grows on demand); page_size: tokens per KV page, a divisor
    of block_size so a prefix-cache block is whole pages. compile: torch.compile every bucket at start (needs
    kv_cache_bytes); compile_cache: a directory that keeps compiled graphs across restarts.
    chunk_size: prompt tokens per prefill chunk. max_queue: requests that may wait behind the running one.
    default_max_tokens: max_tokens when a request leaves it out. handoff_ttl_s: how long a checkpoint waits for
    its decode request (None = the store's default). limits: what one request may ask for. security: TLS and
    bearer token of this server and of its cache-store connection. metrics_port: Prometheus /metrics (0 = off)."""

    model_dir: str
    cache: str
    listen: str = "127.0.0.1:0"
    dtype: str = "auto"
    device: str = "cpu"
    neuron_cores: str | None = None
    kv_cache_bytes: int | None = None
    page_size: int | None = None  # None = gcd(64, block_size)
    compile: bool = False
    compile_cache: str | None = None
    chunk_size: int = 512
    max_queue: int = 64
    threads: int | None = None
    default_max_tokens: int = 256
    handoff_ttl_s: float | None = None
    model_name: str | None = None
    grace_s: float = 5.0
    warmup: bool = True
    block_size: int = 256
    snapshot_interval: int = 2048
    prefix_cache: bool = True
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        self.prefix_policy  # validates block_size / snapshot_interval
        if self.page_size is None:
            self.page_size = math.gcd(DEFAULT_PAGE_SIZE, self.block_size)
        check_model_service(self)
        if self.block_size % self.page_size:
            raise ValueError(f"page_size {self.page_size} must divide block_size {self.block_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.handoff_ttl_s is not None and self.handoff_ttl_s <= 0:
            raise ValueError(f"handoff_ttl_s must be > 0, got {self.handoff_ttl_s}")
        self.default_max_tokens = check_service_limits(self.default_max_tokens, self.limits, self.metrics_port)

    @property
    def prefix_policy(self) -> PrefixPolicy:
        return PrefixPolicy(self.block_size, self.snapshot_interval, self.prefix_cache)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (port 0 = any free port)")
    p.add_argument("--cache", required=True, help="cache store address HOST:PORT")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    add_device_args(p)
    p.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per prefill chunk (default 512)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting behind the running one (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--handoff-ttl", type=float, default=None, help="seconds a checkpoint waits for its decode call")
    p.add_argument("--model-name", default=None)
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls may finish on SIGTERM")
    add_prefix_args(p)
    add_hardening_args(p)


def check_service_limits(default_max_tokens: int, limits: Limits, metrics_port: int) -> int:
    """Validate the hardening options; returns default_max_tokens capped at limits.max_new_tokens."""
    if not 0 <= metrics_port <= 65535:
        raise ValueError(f"metrics_port must be in [0, 65535], got {metrics_port}")
    return min(default_max_tokens, limits.max_new_tokens)


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --neuron-cores and the paged KV cache of a model-serving process (prefill, decode)."""
    p.add_argument("--device", default="cpu", help="torch device: cpu | cuda[:N] | neuron (default cpu)")
    p.add_argument("--neuron-cores", default=None, metavar="LIST",
                   help="NeuronCores this process may use, e.g. 0-3 (sets NEURON_RT_VISIBLE_CORES)")
    p.add_argument("--kv-cache-bytes", type=parse_bytes, default=None, metavar="BYTES",
                   help="paged KV cache size, e.g. 8GiB (default: grows on demand)")
    p.add_argument("--page-size", type=int, default=None,
                   help=f"tokens per KV page; prefill: a divisor of --block-size (default gcd({DEFAULT_PAGE_SIZE}, "
                        f"block size)), decode: default {DEFAULT_PAGE_SIZE}")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prefill chunk / decode step over static buckets at start (needs "
                        "--kv-cache-bytes)")
    p.add_argument("--compile-cache", default=None, metavar="DIR", help="keep compiled graphs here across restarts")


def compile_engine(engine, cfg, chunk_size: int, max_batch: int) -> None:
    """Compile every bucket of a prefill or decode engine if cfg.compile; logs the warm-up time."""
    if cfg.compile:
        buckets = engine.default_buckets(chunk_size, max_batch)
        seconds = engine.compile(buckets, max_batch, cache_dir=cfg.compile_cache)
        logging.getLogger(__name__).info("compiled %d graphs (%s) in %.1f s", buckets.count(), buckets, seconds)


def engine_kwargs(cfg) -> dict:
    """Engine(...) keyword arguments of a prefill or decode config."""
    return dict(dtype=cfg.dtype, threads=cfg.threads, device=cfg.device, kv_cache_bytes=cfg.kv_cache_bytes,
                page_size=cfg.page_size)


def add_hardening_args(p: argparse.ArgumentParser) -> None:
    """Limits, TLS / token flags and --metrics-port of the prefill and decode services."""
    limits_mod.add_args(p)
    security_mod.add_args(p)
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (default 0 = off)")


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=256, help="prefix cache: tokens per KV block (default 256)")
    p.add_argument("--snapshot-interval", type=int, default=2048,
                   help="prefix cache: DeltaNet snapshot every N tokens, a multiple of --block-size (default 2048; "
                        "0 = only at the last block boundary inside each prompt)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="turn the prefix cache off (every prompt is encoded from scratch)")


def config_from_args(args: argparse.Namespace) -> PrefillConfig:
    return PrefillConfig(model_dir=args.model, cache=args.cache, listen=args.listen, dtype=args.dtype,
                         device=args.device, neuron_cores=args.neuron_cores, kv_cache_bytes=args.kv_cache_bytes,
                         page_size=args.page_size, compile=args.compile, compile_cache=args.compile_cache,
                         chunk_size=args.chunk_size, max_queue=args.max_queue, threads=args.threads,
                         default_max_tokens=args.default_max_tokens, grace_s=args.grace,
                         handoff_ttl_s=args.handoff_ttl, model_name=args.model_name, block_size=args.block_size,
                         snapshot_interval=args.snapshot_interval, prefix_cache=args.prefix_cache,
                         limits=limits_mod.from_args(args), security=security_mod.from_args(args),
                         metrics_port=args.metrics_port)
