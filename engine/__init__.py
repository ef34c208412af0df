"""The model code the prefill and decode services share: config and presets (config.py), how to run a
checkpoint (engine_config.py: EngineConfig, its flags and checks, declared once), safetensors loading
(weights.py), the hybrid layers and model (layers.py, model.py), the device engine with its two code paths,
chunked prefill and batched decode (engine.py), the compiled-graph runner over static buckets (runner.py), the
paged KV cache (kv_cache.py, with its plain page bookkeeping in pages.py), the contract of the state that moves
between services (state_spec.py) and per-sequence state (state.py), devices (device.py), sampling
(sampling.py), stop conditions and streamed text (output.py), the tokenizer (tokenizer.py), the in-process loop
(generate.py), `init-model` (init_model.py), `check-device` (check_device.py) and tensor parallelism (tp/).
Math kernels come from qwenpd.kernels; nothing here knows about gRPC.

Importing this package imports no torch (it only asks torch, through the environment, for huge pages under its
weights: host.py): the names below load their modules on first use, so plain bookkeeping (pages.py,
engine_config.py) stays importable on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

from qwenpd.engine.host import prefer_huge_pages
from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
prefer_huge_pages()  # before torch's first allocation, where this import comes first (engine/host.py)

_EXPORTS = {
    "PRESETS": "config", "ConfigError": "config", "ModelConfig": "config", "preset": "config",
    "DecodeBatch": "engine", "Engine": "engine", "EngineConfig": "engine_config", "chunk_spans": "engine",
    "Sampler": "sampling", "SamplingParams": "sampling", "HybridState": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
