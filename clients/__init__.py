"""Callers of the services: `Client` / `AsyncClient` (prefill -> decode with one call, resuming a stream whose
decode instance died), one exception class per failure kind (`qwenpd.clients.errors`), and least-loaded
routing over several addresses (`qwenpd.clients.routing`, plain Python). The serving CLI and the process
supervisor are not here: they are `qwenpd.serve` and `qwenpd.supervisor`.

    from qwenpd.clients import Client

Importing this package imports neither torch nor grpc; the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)

_EXPORTS = {
    "AsyncClient": "client", "Chunk": "client", "Client": "client", "Result": "client",
    "Cancelled": "errors", "DataLoss": "errors", "DeadlineExceeded": "errors", "FailedPrecondition": "errors",
    "InvalidArgument": "errors", "NotFound": "errors", "QwenpdError": "errors", "RemoteError": "errors",
    "ResourceExhausted": "errors", "Unauthenticated": "errors", "Unavailable": "errors",
}
_FROM_SECURITY = {"Security"}

__all__ = sorted([*_EXPORTS, *_FROM_SECURITY])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _FROM_SECURITY:
        return getattr(importlib.import_module("qwenpd.security"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
