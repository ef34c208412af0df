"""DecodeConfig: everything the decode service is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qwenpd import service_config
from qwenpd.limits import Limits
from qwenpd.security import Security
from qwenpd.service_config import DEFAULT_GRACE_S, check_model_service


@dataclass(slots=True)
class DecodeConfig:
    """model_dir: HF-format checkpoint (the same model as prefill's: checkpoints of another are refused).
    listen: HOST:PORT (port 0 = any free port). cache: cache store address. max_batch: sequences stepped
    together. max_queue: sequences that may wait for a slot. default_max_tokens: max_tokens when a request
    overrides sampling without giving it. limits: what one request may ask for (sampling overrides, message
    size). security: TLS and bearer token of this server and of its cache-store connection. metrics_port:
    Prometheus /metrics (0 = off)."""

    model_dir: str
    cache: str
    listen: str = "127.0.0.1:0"
    dtype: str = "auto"
    max_batch: int = 32
    max_queue: int = 256
    threads: int | None = None
    default_max_tokens: int = 256
    grace_s: float = DEFAULT_GRACE_S
    warmup: bool = True
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        check_model_service(self)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


def add_args(p: argparse.ArgumentParser) -> None:
    d = service_config.field_defaults(DecodeConfig)
    service_config.add_model_service_args(p, d)
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"sequences stepped together (default {d.max_batch})")


def config_from_args(args: argparse.Namespace) -> DecodeConfig:
    return service_config.from_args(DecodeConfig, args)
