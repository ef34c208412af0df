"""A test double for the NKI 0.3.0 subset the DeltaNet kernels use, so they run (and are checked) without the SDK.

Use it like the real package: this module stands for `nki`, `.language` for `nki.language`, `.isa` for
`nki.isa`; `simulate(kernel)(*numpy_arrays)` runs a kernel the way `nki.simulate` does
(https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.simulate.html and the
"NKI CPU Simulator" guide: NumPy arguments become HBM tensors, the kernel runs eagerly as Python, new tensors
hold NaN, returned tensors come back as NumPy arrays).

What it adds over the official simulator: the on-chip capacity checks (SBUF budget, PSUM banks), which that
simulator does not do. What it lacks: everything outside the handful of calls used here, dtypes other than
fp32, engine timing, and the hardware's polynomial activation approximations. It is not a reference for NKI
semantics beyond what the cited doc pages say; the real `nki.simulate` runs the same kernels when installed.
"""

from __future__ import annotations

import functools

import numpy as np

from qwenpd.kernels.nki.emulator import isa, language
from qwenpd.kernels.nki.emulator.core import (ConstraintError, Ledger, Tensor, private_hbm, require, set_ledger,
                                              shared_hbm)

__all__ = ["ConstraintError", "Ledger", "isa", "jit", "language", "simulate"]


class Kernel:
    """What @jit returns: the function, runnable only through simulate() here (there is no device)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("the NKI emulator has no device: run kernels with simulate(kernel)(*arrays)")


def jit(fn=None, **_options):
    """@nki.jit: mark a kernel (aws-neuron-sdk nki/api/generated/nki.jit.rst). Compile options are ignored."""
    return Kernel(fn) if fn is not None else Kernel


def _enter_kernel(fn, args, kwargs):
    # Allocation sites are recorded up to this frame (see core.allocation_site).
    return fn(*args, **kwargs)


def _to_tensor(x):
    return Tensor(x, private_hbm) if isinstance(x, np.ndarray) else x


def _to_numpy(x):
    if isinstance(x, tuple):
        return tuple(_to_numpy(y) for y in x)
    if isinstance(x, Tensor):
        require(x.buffer is shared_hbm, f"kernel outputs must be allocated in nl.shared_hbm, got {x.buffer}")
        return x.data
    return x


def simulate(kernel, ledger: Ledger | None = None):
    """Run `kernel` on NumPy arrays; inputs the kernel writes are updated in place. Returns NumPy results.

    Pass a Ledger to read the on-chip usage afterwards (tests do).
    """
    fn = kernel.fn if isinstance(kernel, Kernel) else kernel

    def run(*args, **kwargs):
        set_ledger(ledger if ledger is not None else Ledger(), _enter_kernel.__code__)
        try:
            result = _enter_kernel(fn, [_to_tensor(a) for a in args], {k: _to_tensor(v) for k, v in kwargs.items()})
        finally:
            set_ledger(None)
        return _to_numpy(result)

    return run
