"""DecodeConfig: everything the decode service is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qwenpd.prefill_service.config import (DTYPE_CHOICES, add_device_args, add_hardening_args, check_model_service,
                                           check_service_limits)
from qwenpd.engine.kv_cache import DEFAULT_PAGE_SIZE
from qwenpd import limits as limits_mod
from qwenpd import security as security_mod
from qwenpd.limits import Limits
from qwenpd.security import Security


@dataclass(slots=True)
class DecodeConfig:
    """model_dir: HF-format checkpoint (the same model as prefill's: checkpoints of another are refused).
    listen: HOST:PORT (port 0 = any free port). cache: cache store address. device: torch device of the engine;
    neuron_cores: NeuronCores visible to this process (e.g. '4-7'). kv_cache_bytes: size of the paged KV cache
    (None = grows on demand; with a size, a sequence is admitted only when the pages of its longest KV are free). max_batch: sequences stepped
    together. max_queue: sequences that may wait for a slot. default_max_tokens: max_tokens when a request
    overrides sampling without giving it. limits: what one request may ask for (sampling overrides, message
    size). security: TLS and bearer token of this server and of its cache-store connection. metrics_port:
    Prometheus /metrics (0 = off)."""

    model_dir: str
    cache: str
    listen: str = "127.0.0.1:0"
    dtype: str = "auto"
    device: str = "cpu"
    neuron_cores: str | None = None
    kv_cache_bytes: int | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    compile: bool = False
    compile_cache: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    threads: int | None = None
    default_max_tokens: int = 256
    grace_s: float = 5.0
    warmup: bool = True
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        check_model_service(self)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        self.default_max_tokens = check_service_limits(self.default_max_tokens, self.limits, self.metrics_port)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (port 0 = any free port)")
    p.add_argument("--cache", required=True, help="cache store address HOST:PORT")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    add_device_args(p)
    p.add_argument("--max-batch", type=int, default=32, help="sequences stepped together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences that may wait for a slot (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls may finish on SIGTERM")
    add_hardening_args(p)


def config_from_args(args: argparse.Namespace) -> DecodeConfig:
    return DecodeConfig(model_dir=args.model, cache=args.cache, listen=args.listen, dtype=args.dtype,
                        device=args.device, neuron_cores=args.neuron_cores, kv_cache_bytes=args.kv_cache_bytes,
                        page_size=args.page_size or DEFAULT_PAGE_SIZE, compile=args.compile,
                        compile_cache=args.compile_cache,
                        max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads,
                        default_max_tokens=args.default_max_tokens, grace_s=args.grace,
                        limits=limits_mod.from_args(args), security=security_mod.from_args(args),
                        metrics_port=args.metrics_port)
