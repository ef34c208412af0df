"""What the server configs share: the server options every qwenpd server has (listen address, grace, TLS and
bearer token, Prometheus port), their checks, and the one way to turn a config dataclass into
command-line flags and back (the model services' own shared fields are `qwenpd.model_service`).

Each default is written once, on the config dataclass; flags read it from there (`field_defaults`), and
`from_args` builds the config from the parsed flags by field name (each flag's `dest` is its field's name).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from qwenpd import limits as limits_mod
from qwenpd import security as security_mod
from qwenpd.address import split_address

DEFAULT_GRACE_S = 5.0  # seconds in-flight calls may finish on SIGTERM

C = TypeVar("C")


def field_defaults(cls: type) -> argparse.Namespace:
    """The defaults of a config dataclass's fields, as a namespace (`d.max_queue`)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return argparse.Namespace(**out)


def from_args(cls: type[C], args: argparse.Namespace, **given) -> C:
    """Build config `cls` from parsed flags: every field with a flag of that `dest`; the `limits` and `security`
    fields (when the class has them) from their flag groups; `given` fields as they are."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if "limits" in names:
        kw["limits"] = limits_mod.from_args(args)
    if "security" in names:
        kw["security"] = security_mod.from_args(args)
    return cls(**{**kw, **given})


def add_server_args(p: argparse.ArgumentParser, d: argparse.Namespace) -> None:
    """--listen, --grace, TLS / token flags and --metrics-port: the flags every qwenpd server takes."""
    p.add_argument("--listen", default=d.listen, help=f"HOST:PORT to serve on, port 0 = any free port "
                                                       f"(default {d.listen})")
    p.add_argument("--grace", type=float, default=d.grace_s, dest="grace_s", metavar="SECONDS",
                   help=f"seconds in-flight calls may finish on SIGTERM (default {d.grace_s:g})")
    security_mod.add_args(p)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="serve Prometheus /metrics here (default 0 = off)")


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
