"""Math kernels of qwenpd: Gated DeltaNet recurrence and its causal conv, each a naive reference + fast paths.

Backend-specific kernels live in subpackages imported on demand (e.g. `qwenpd.kernels.nki` on trn2), never here.
The names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)

_EXPORTS = {
    "causal_conv1d": "causal_conv1d", "causal_conv1d_update": "causal_conv1d", "naive_causal_conv1d": "causal_conv1d",
    "chunk_gated_delta_rule": "gated_delta_rule", "naive_gated_delta_rule": "gated_delta_rule",
    "step_gated_delta_rule": "gated_delta_rule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
