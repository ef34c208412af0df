"""Which NKI runs the kernels, and how the one kernel source binds to it.

The kernel modules (deltanet_chunk.py, deltanet_step.py) start with `nki, nl, nisa = bound_modules()` instead
of `import nki`. `load_kernels(mode)` executes a fresh copy of each module with the requested modules bound, so
the same source runs unchanged under:

- "emulator": kernels.nki.emulator (always available; the test double);
- "simulate": the real `nki.simulate` on CPU (Neuron SDK 2.29+ / NKI 0.3.0 installed);
- "device":   the real `@nki.jit` kernels called on torch tensors on a Neuron (XLA) device.

The mode comes from QWENPD_NKI_MODE (emulator | simulate | device | auto, default auto); auto is "simulate"
when `import nki` works and "emulator" otherwise. "device" is never picked automatically.
A plain `import kernels.nki.deltanet_chunk` binds the auto choice.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MODES = ("emulator", "simulate", "device")
_KERNEL_MODULES = ("deltanet_chunk", "deltanet_step")
_binding = threading.local()


@dataclass(frozen=True)
class Modules:
    mode: str
    nki: ModuleType
    nl: ModuleType
    nisa: ModuleType


@functools.cache
def real_nki_available() -> bool:
    try:
        import nki
        import nki.isa
        import nki.language
    except ImportError:
        return False
    return hasattr(nki, "simulate")


def resolve_mode(mode: str | None = None) -> str:
    mode = (mode or os.environ.get("QWENPD_NKI_MODE") or "auto").lower()
    if mode == "auto":
        return "simulate" if real_nki_available() else "emulator"
    if mode not in MODES:
        raise ValueError(f"NKI mode must be one of auto, {', '.join(MODES)}; got {mode!r}")
    if mode != "emulator" and not real_nki_available():
        raise ValueError(f"NKI mode {mode!r} needs the Neuron SDK (`import nki` failed)")
    return mode


def modules_for(mode: str) -> Modules:
    if mode == "emulator":
        from qwenpd.kernels.nki import emulator

        return Modules(mode, emulator, emulator.language, emulator.isa)
    import nki
    import nki.isa
    import nki.language

    return Modules(mode, nki, nki.language, nki.isa)


def bound_modules() -> tuple[Any, Any, Any]:
    """(nki, nl, nisa) for the kernel module being loaded; the auto choice on a plain import."""
    mods = getattr(_binding, "modules", None) or modules_for(resolve_mode())
    return mods.nki, mods.nl, mods.nisa


@functools.cache
def load_kernels(mode: str) -> dict[str, ModuleType]:
    """Fresh copies of the kernel modules bound to `mode`'s modules, by short name."""
    mods, loaded = modules_for(mode), {}
    here = Path(__file__).parent
    for name in _KERNEL_MODULES:
        spec = importlib.util.spec_from_file_location(f"qwenpd.kernels.nki._{mode}.{name}", here / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        _binding.modules = mods
        try:
            spec.loader.exec_module(module)
        finally:
            _binding.modules = None
        loaded[name] = module
    return loaded


def run_kernel(mode: str, kernel, arrays: list, **static) -> tuple:
    """Run a kernel on NumPy inputs; returns its outputs as NumPy arrays."""
    if mode == "device":  # not exercised here: needs torch-neuronx on a trn2 host
        import torch
        import torch_xla.core.xla_model as xm

        device = xm.xla_device()
        outs = kernel(*[torch.from_numpy(a).to(device) for a in arrays], **static)
        return tuple(o.cpu().numpy() for o in outs)
    simulate = modules_for(mode).nki.simulate
    return tuple(simulate(kernel)(*arrays, **static))
