"""What the server configs share: the server options every qwenpd server has (listen address, grace, TLS and
bearer token, Prometheus port), the fields of the two model services (prefill and decode), their checks, and
the one way to turn a config dataclass into command-line flags and back.

Each default is written once, on the config dataclass; flags read it from there (`field_defaults`), and
`from_args` builds the config from the parsed flags by field name (each flag's `dest` is its field's name).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qwenpd import limits as limits_mod
from qwenpd import security as security_mod
from qwenpd.address import split_address
from qwenpd.limits import Limits
from qwenpd.security import Security

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DEFAULT_GRACE_S = 5.0  # seconds in-flight calls may finish on SIGTERM

C = TypeVar("C")


@dataclass(slots=True)
class ModelServiceConfig:
    """What the prefill and decode services are both started with (each subclass adds its own fields).

    model_dir: HF-format checkpoint (prefill and decode must load the same model: checkpoints of another are
    refused). cache: cache store address. listen: HOST:PORT (port 0 = any free port). max_queue: requests that
    may wait. threads: torch CPU threads. default_max_tokens: max_tokens when a request leaves it out (capped at
    limits.max_new_tokens). grace_s: drain time on SIGTERM. warmup: run one tiny request at start. limits: what
    one request may ask for. security: TLS and bearer token of this server and of its cache-store connection.
    metrics_port: Prometheus /metrics (0 = off)."""

    model_dir: str
    cache: str
    listen: str = "127.0.0.1:0"
    dtype: str = "auto"
    max_queue: int = 64
    threads: int | None = None
    default_max_tokens: int = 256
    grace_s: float = DEFAULT_GRACE_S
    warmup: bool = True
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        check_model_service(self)


def field_defaults(cls: type) -> argparse.Namespace:
    """The defaults of a config dataclass's fields, as a namespace (`d.max_queue`)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return argparse.Namespace(**out)


def from_args(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """Build config `cls` from parsed flags: every field with a flag of that `dest`, plus `extra`; the
    `limits` and `security` fields (when the class has them) from their flag groups."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if "limits" in names:
        kw["limits"] = limits_mod.from_args(args)
    if "security" in names:
        kw["security"] = security_mod.from_args(args)
    kw.update(extra)
    return cls(**kw)


def add_server_args(p: argparse.ArgumentParser, d: argparse.Namespace) -> None:
    """--listen, --grace, TLS / token flags and --metrics-port: the flags every qwenpd server takes."""
    p.add_argument("--listen", default=d.listen, help=f"HOST:PORT to serve on, port 0 = any free port "
                                                       f"(default {d.listen})")
    p.add_argument("--grace", type=float, default=d.grace_s, dest="grace_s", metavar="SECONDS",
                   help=f"seconds in-flight calls may finish on SIGTERM (default {d.grace_s:g})")
    security_mod.add_args(p)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="serve Prometheus /metrics here (default 0 = off)")


def add_model_service_args(p: argparse.ArgumentParser, d: argparse.Namespace) -> None:
    """The flags prefill and decode share (defaults from their config class `d`)."""
    p.add_argument("--model", required=True, dest="model_dir", help="checkpoint directory")
    p.add_argument("--cache", required=True, help="cache store address HOST:PORT")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES)
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests that may wait (default {d.max_queue})")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    add_server_args(p, d)
    limits_mod.add_args(p)


def check_address(field: str, address: str) -> None:
    """ValueError naming `field` unless `address` is HOST:PORT."""
    try:
        split_address(address)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


def check_server(listen: str, grace_s: float, metrics_port: int) -> None:
    """The checks of the options every server has; ValueError naming the field."""
    check_address("listen", listen)
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    if not 0 <= metrics_port <= 65535:
        raise ValueError(f"metrics_port must be in [0, 65535], got {metrics_port}")


def check_model_service(cfg: ModelServiceConfig) -> None:
    """The checks a model-serving config (prefill or decode) shares: checkpoint, addresses, dtype, queue,
    threads, default max_tokens, grace and metrics port; ValueError naming the field. Caps
    `cfg.default_max_tokens` at the limits' max_new_tokens."""
    if not (Path(cfg.model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir {cfg.model_dir!r} has no config.json")
    check_server(cfg.listen, cfg.grace_s, cfg.metrics_port)
    check_address("cache", cfg.cache)
    if cfg.dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {cfg.dtype!r}")
    if cfg.max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {cfg.max_queue}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1, got {cfg.default_max_tokens}")
    limits: Limits = cfg.limits
    cfg.default_max_tokens = min(cfg.default_max_tokens, limits.max_new_tokens)
