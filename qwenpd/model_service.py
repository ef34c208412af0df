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
from typing import TYPE_CHECKING, TypeVar

from qwenpd import limits as limits_mod
from qwenpd import service_config
from qwenpd.engine import engine_config
from qwenpd.engine.engine_config import MAX_SPECULATIVE_TOKENS, EngineConfig
from qwenpd.limits import Limits
from qwenpd.security import Security
from qwenpd.service_config import DEFAULT_GRACE_S, add_server_args, check_address, check_server

if TYPE_CHECKING:  # torch is imported where an engine is built: the supervisor, gateway and store read these
    from qwenpd.engine.engine import Engine  # configs without it

C = TypeVar("C")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelServiceConfig:
    """What the prefill and decode services are both started with (each subclass adds its own fields).

    engine: how the service runs its checkpoint (qwenpd.engine.engine_config.EngineConfig: model_dir, dtype,
    device, NeuronCores, KV cache size, page size (None: the service's default), tensor-parallel degree, compile
    options; prefill and decode must load the same model: checkpoints of another are refused). cache: cache store
    address. listen: HOST:PORT (port 0 = any free port). max_queue: requests that may wait. default_max_tokens:
    max_tokens when a request leaves it out (capped at limits.max_new_tokens). grace_s: drain time on SIGTERM.
    limits: what one request may ask for. security: TLS and bearer token
    of this server and of its cache-store connection. metrics_port: Prometheus /metrics (0 = off)."""

    engine: EngineConfig
    cache: str
    listen: str = "127.0.0.1:0"
    max_queue: int = 64
    default_max_tokens: int = 256
    grace_s: float = DEFAULT_GRACE_S
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        check_model_service(self)

    @property
    def model_dir(self) -> str:
        return self.engine.model_dir


def add_model_service_args(p: argparse.ArgumentParser, d: argparse.Namespace, engine_defaults: EngineConfig) -> None:
    """The flags prefill and decode share (defaults from their config class `d` and its engine defaults)."""
    p.add_argument("--model", required=True, dest="model_dir", help="checkpoint directory")
    p.add_argument("--cache", required=True, help="cache store address HOST:PORT")
    engine_config.add_args(p, engine_defaults)
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests that may wait (default {d.max_queue})")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help=f"max_tokens of a request that gives none (default {d.default_max_tokens}; at most "
                        "--max-new-tokens)")
    add_server_args(p, d)
    limits_mod.add_args(p)
    add_speculative_args(p)


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding with the checkpoint's MTP head (mtp.* weights): prefill hands decode "
                   "the head's state, decode drafts K tokens per step and verifies them in one pass; the tokens are "
                   "those of plain decoding (default 0 = off; give prefill and decode the same K)")


def model_service_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Config `cls` (PrefillConfig, DecodeConfig) from the flags of add_model_service_args and its own."""
    engine = engine_config.from_args(args, args.model_dir)
    return service_config.from_args(cls, args, engine=engine)


def check_model_service(cfg: ModelServiceConfig) -> None:
    """The checks a model-serving config (prefill or decode) adds to its EngineConfig's; ValueError naming the
    field. Caps `cfg.default_max_tokens` at the limits' max_new_tokens."""
    if not isinstance(cfg.engine, EngineConfig):
        raise ValueError(f"engine must be an EngineConfig, got {type(cfg.engine).__name__}")
    cfg.engine.check_model()
    check_server(cfg.listen, cfg.grace_s, cfg.metrics_port)
    check_address("cache", cfg.cache)
    if cfg.max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {cfg.max_queue}")
    if cfg.default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1, got {cfg.default_max_tokens}")
    cfg.default_max_tokens = min(cfg.default_max_tokens, cfg.limits.max_new_tokens)
    engine_config.check_draft_quantize(cfg.engine.replace(speculative=cfg.num_speculative_tokens > 0))
    if cfg.num_speculative_tokens:
        check_speculative(cfg.engine, cfg.num_speculative_tokens)




def check_speculative(ec: EngineConfig, k: int) -> None:
    """ValueError unless `ec` can run speculative decoding with k drafts: the checkpoint's MTP head is there, and
    the graphs, compiled, are compiled by region (engine/speculative.py runs the decode step's regions)."""
    from qwenpd.engine.config import ModelConfig
    from qwenpd.engine.weight_layout import check_mtp_head

    if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}")
    if ec.compile and ec.whole_graphs:
        raise ValueError("--num-speculative-tokens with --compile needs the graphs compiled by region (the verify "
                         "pass runs the decode step's regions): drop --whole-graphs")
    if ec.compile and ec.device != "cpu":
        raise ValueError("--num-speculative-tokens with --compile runs on CPU for now (regions compiled on CPU "
                         "only): drop --compile or --device")
    check_mtp_head(ec.model_dir, ModelConfig.from_pretrained(ec.model_dir))


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


def build_engine(cfg: ModelServiceConfig, chunk_size: int, max_batch: int, graphs: tuple[str, ...],
                 verify: tuple[int, int] = (0, 0)) -> Engine:
    """The service's engine on its device; when its config says compile, the graphs it runs (`graphs`: "prefill",
    "decode") compiled over every bucket (warm-up time logged), and for speculative verify passes of up to
    `verify` = (sequences, tokens each) (Engine.compile)."""
    from qwenpd.engine.engine import Engine

    ec = cfg.engine.replace(speculative=cfg.num_speculative_tokens > 0)  # the MTP head and its KV's pages
    engine = Engine(ec)
    if engine.group is not None:
        engine.group.on_lost = _stop_on_rank_loss
    if ec.kv_cache_bytes is not None:
        cache = engine.kv_cache
        log.info("KV cache: %d pages of %d tokens, %.1f MiB (--kv-cache-bytes %s)", cache.num_pages,
                 cache.page_size, cache.num_bytes / (1 << 20), ec.kv_cache_bytes)
    if ec.compile:
        buckets = engine.default_buckets(chunk_size, max_batch)
        seconds = engine.compile(buckets, max_batch, cache_dir=ec.compile_cache, graphs=graphs,
                                 regional=False if ec.whole_graphs else None, verify=verify)
        buckets = engine.runner.buckets
        log.info("compiled %d %s graphs (%s) in %.1f s", buckets.count(graphs), "+".join(graphs), buckets, seconds)
    return engine
