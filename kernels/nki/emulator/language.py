"""The `nki.language` subset the DeltaNet kernels use: memories, dtypes, tensor creation, loop iterators, operators.

Doc pages:
- nl.ndarray(shape, dtype, buffer=nl.sbuf, name=""): https://awsdocs-neuron.readthedocs-hosted.com/general/nki/api/generated/nki.language.ndarray.html
  (buffer defaults to sbuf and takes buffer objects, not strings, since NKI 0.3.0: NKI 0.3.0 Update Guide,
  aws-neuron-sdk nki/migration/nki-0-3-0-update-guide.rst).
- nl.affine_range: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.language.affine_range.html
- nl.sequential_range: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.language.sequential_range.html
- nl.static_range: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.language.static_range.html
- operators and activation functions: "NKI API Common Fields",
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/nki.api.shared.html
- nl.tile_size: https://awsdocs-neuron.readthedocs-hosted.com/en/v2.30.0/nki/api/nki.language.tile_size.html
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qwenpd.kernels.nki.emulator.core import (
    PMAX,
    PSUM_BANK_BYTES,
    PSUM_BANKS,
    Buffer,
    Tensor,
    active_ledger,
    allocation_site,
    hbm,
    private_hbm,
    psum,
    require,
    sbuf,
    shared_hbm,
)

__all__ = [
    "add",
    "affine_range",
    "copy",
    "exp",
    "float32",
    "hbm",
    "maximum",
    "minimum",
    "multiply",
    "ndarray",
    "private_hbm",
    "psum",
    "sbuf",
    "sequential_range",
    "shared_hbm",
    "static_range",
    "subtract",
    "tile_size",
]

# Only float32: NumPy has no bfloat16 here and every tensor of these kernels is fp32.
float32 = np.dtype(np.float32)
SUPPORTED_DTYPES = (float32,)


def ndarray(shape, dtype, buffer: Buffer = sbuf, name: str = "") -> Tensor:
    """A new tensor filled with NaN, as the official simulator does, so reads of unwritten memory show up."""
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    require(isinstance(buffer, Buffer), f"buffer must be nl.sbuf/nl.psum/nl.shared_hbm/..., got {buffer!r}")
    require(dtype in SUPPORTED_DTYPES, f"dtype {dtype} is not modelled by this emulator")
    require(len(shape) >= 1 and all(n > 0 for n in shape), f"bad shape {shape}")
    if buffer.on_chip:
        require(len(shape) >= 2, f"{buffer.name} tensors need a partition axis and a free axis, got {shape}")
        require(shape[0] <= PMAX, f"{buffer.name} tensor partition dimension {shape[0]} exceeds {PMAX}")
        if buffer is psum:
            require(dtype == float32, "PSUM tensors here are float32 (matmul accumulates in fp32)")
        active_ledger().allocate(buffer, shape, dtype, allocation_site(1))
    else:
        active_ledger()
    return Tensor(np.full(shape, np.nan, dtype=dtype), buffer)


def affine_range(start, stop=None, step=1) -> range:
    """Iterations without a loop-carried dependency (run in order here; the compiler may reorder them)."""
    return range(start, stop, step) if stop is not None else range(start)


def sequential_range(start, stop=None, step=1) -> range:
    """Iterations with a loop-carried dependency, in order."""
    return range(start, stop, step) if stop is not None else range(start)


def static_range(start, stop=None, step=1) -> range:
    """A loop the compiler unrolls while tracing."""
    return range(start, stop, step) if stop is not None else range(start)


class tile_size:
    pmax = PMAX
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    psum_fmax = PSUM_BANK_BYTES // 4
    psum_num_banks = PSUM_BANKS


@dataclass(frozen=True)
class Operator:
    """An ALU operator (tensor_tensor/tensor_scalar) or an activation function (activation)."""

    name: str
    fn: Callable
    kind: str  # "alu" or "act"
    valid: tuple[float, float] = (-np.inf, np.inf)

    def __repr__(self) -> str:
        return f"nl.{self.name}"


add = Operator("add", np.add, "alu")
subtract = Operator("subtract", np.subtract, "alu")
multiply = Operator("multiply", np.multiply, "alu")
maximum = Operator("maximum", np.maximum, "alu")
minimum = Operator("minimum", np.minimum, "alu")
exp = Operator("exp", np.exp, "act")  # valid input range [-inf, inf]
copy = Operator("copy", lambda x: x, "act")
