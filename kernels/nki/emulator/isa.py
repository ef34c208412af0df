"""The `nki.isa` instructions the DeltaNet kernels use, destination-passing as in NKI 0.3.0.

Each one checks the operand memories, shapes and sizes its doc page states, then computes in fp32 NumPy
(the engines compute arithmetic in fp32 and cast to dst.dtype). Unsupported keyword arguments are left out
on purpose: a kernel that needs one fails here with a TypeError instead of getting the wrong semantics.
"""

from __future__ import annotations

import numpy as np

from qwenpd.kernels.nki.emulator.core import (
    PSUM_BANK_BYTES,
    Tensor,
    check_buffer,
    private_hbm,
    psum,
    require,
    sbuf,
    shared_hbm,
)
from qwenpd.kernels.nki.emulator.language import Operator, float32

__all__ = [
    "activation",
    "dma_copy",
    "memset",
    "nc_matmul",
    "scalar_tensor_tensor",
    "tensor_copy",
    "tensor_scalar",
    "tensor_tensor",
]

ON_CHIP = (sbuf, psum)
HBM = (private_hbm, shared_hbm)
MATMUL_DTYPES = (np.dtype(np.float32),)  # bf16/fp16/fp8/tf32 are legal on trn2 but not modelled here


def _same_lanes(dst: Tensor, *srcs: Tensor, what: str) -> None:
    for s in srcs:
        require(s.shape[0] == dst.shape[0], f"{what}: operands span {s.shape[0]} and {dst.shape[0]} partitions")


def _write(dst: Tensor, value: np.ndarray) -> None:
    dst.data[...] = value.astype(dst.dtype, copy=False)


def _operand(x, data: Tensor, what: str):
    """A compile-time scalar or a [P, 1] vector broadcast along the free axis."""
    if isinstance(x, Tensor):
        check_buffer(x, ON_CHIP, what)
        require(x.shape == (data.shape[0], 1), f"{what} must be a ({data.shape[0]}, 1) vector, got {x.shape}")
        return x.data.astype(np.float32).reshape((data.shape[0],) + (1,) * (data.ndim - 1))
    require(isinstance(x, (int, float)) and not isinstance(x, bool), f"{what} must be a scalar or a tensor")
    return np.float32(x)


def _alu(op, what: str) -> Operator:
    require(isinstance(op, Operator) and op.kind == "alu", f"{what} must be an arithmetic operator, got {op!r}")
    return op


def nc_matmul(dst: Tensor, stationary: Tensor, moving: Tensor, accumulate: bool | None = None) -> None:
    """dst (=|+=) stationary.T @ moving on the Tensor Engine, accumulated in fp32 in PSUM.

    https://awsdocs-neuron.readthedocs-hosted.com/en/v2.30.0/nki/api/generated/nki.isa.nc_matmul.html;
    limits from the architecture guide's "Tile Size": stationary/moving in SBUF, dst in PSUM, shared partition
    (contraction) size <= 128, stationary free size <= 128, moving free size <= 512 because the output must fit
    one 2 KiB PSUM bank. `accumulate` (NKI 0.3.0 Update Guide, "Matmul Accumulation"): True adds, False
    overwrites; None (auto: the first write overwrites) is refused here, so kernels state which they mean.
    """
    check_buffer(stationary, (sbuf,), "nc_matmul stationary")
    check_buffer(moving, (sbuf,), "nc_matmul moving")
    check_buffer(dst, (psum,), "nc_matmul dst")
    require(stationary.ndim == moving.ndim == dst.ndim == 2, "nc_matmul operands are 2-D tiles here")
    (k, m), (k2, n) = stationary.shape, moving.shape
    require(k == k2, f"nc_matmul: stationary and moving contract over {k} and {k2} partitions")
    require(m <= 128, f"nc_matmul: stationary free size {m} exceeds 128")
    require(n <= 512, f"nc_matmul: moving free size {n} exceeds 512")
    require(dst.shape == (m, n), f"nc_matmul: dst shape {dst.shape}, expected {(m, n)}")
    require(stationary.dtype in MATMUL_DTYPES and moving.dtype in MATMUL_DTYPES, "nc_matmul: input dtype")
    require(dst.dtype == float32, "nc_matmul: dst must be float32")
    lo, hi = dst.free_byte_range()
    require(lo // PSUM_BANK_BYTES == hi // PSUM_BANK_BYTES, "nc_matmul: dst crosses a 2 KiB PSUM bank boundary")
    require(accumulate is not None, "nc_matmul: pass accumulate=True or False explicitly")
    product = stationary.data.T @ moving.data  # float32 GEMM: fp32 products and accumulation
    _write(dst, dst.data + product if accumulate else product)


def tensor_tensor(dst: Tensor, data1: Tensor, data2: Tensor, op: Operator) -> None:
    """dst = data1 <op> data2 element-wise on the Vector Engine, in fp32.

    https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.isa.tensor_tensor.html:
    dst in SBUF or PSUM; data1 and data2 cannot both be in PSUM. Same shapes required here.
    """
    for t, name in ((dst, "dst"), (data1, "data1"), (data2, "data2")):
        check_buffer(t, ON_CHIP, f"tensor_tensor {name}")
    require(not (data1.buffer is psum and data2.buffer is psum), "tensor_tensor: data1 and data2 both in PSUM")
    require(data1.shape == data2.shape == dst.shape,
            f"tensor_tensor: shapes {data1.shape}, {data2.shape} -> {dst.shape}")
    _write(dst, _alu(op, "tensor_tensor op").fn(data1.data.astype(np.float32), data2.data.astype(np.float32)))


def tensor_scalar(dst: Tensor, data: Tensor, op0: Operator, operand0, reverse0: bool = False,
                  op1: Operator | None = None, operand1=None, reverse1: bool = False) -> None:
    """dst = (data <op0> operand0) <op1> operand1, operands scalars or [P, 1] vectors broadcast along free axes.

    https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.isa.tensor_scalar.html:
    data in SBUF or PSUM; op1/operand1 both None when unused; reverse flags swap the operand order.
    """
    check_buffer(dst, ON_CHIP, "tensor_scalar dst")
    check_buffer(data, ON_CHIP, "tensor_scalar data")
    require(dst.shape == data.shape, f"tensor_scalar: shapes {data.shape} -> {dst.shape}")
    require((op1 is None) == (operand1 is None), "tensor_scalar: op1 and operand1 go together")
    x, a = data.data.astype(np.float32), _operand(operand0, data, "tensor_scalar operand0")
    x = _alu(op0, "op0").fn(a, x) if reverse0 else op0.fn(x, a)
    if op1 is not None:
        b = _operand(operand1, data, "tensor_scalar operand1")
        x = _alu(op1, "op1").fn(b, x) if reverse1 else op1.fn(x, b)
    _write(dst, x)


def scalar_tensor_tensor(dst: Tensor, data: Tensor, op0: Operator, operand0, op1: Operator, operand1: Tensor,
                         reverse0: bool = False, reverse1: bool = False) -> None:
    """dst = (data <op0> operand0) <op1> operand1: a tensor_scalar step then a tensor_tensor step.

    https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.isa.scalar_tensor_tensor.html:
    operand0 a scalar or a [P, 1] vector, operand1 a tile shaped like data; data and operand1 not both in PSUM.
    """
    for t, name in ((dst, "dst"), (data, "data"), (operand1, "operand1")):
        check_buffer(t, ON_CHIP, f"scalar_tensor_tensor {name}")
    require(not (data.buffer is psum and operand1.buffer is psum),
            "scalar_tensor_tensor: data and operand1 both in PSUM")
    require(data.shape == operand1.shape == dst.shape, "scalar_tensor_tensor: shapes differ")
    x, a = data.data.astype(np.float32), _operand(operand0, data, "scalar_tensor_tensor operand0")
    x = _alu(op0, "op0").fn(a, x) if reverse0 else op0.fn(x, a)
    y = operand1.data.astype(np.float32)
    _write(dst, _alu(op1, "op1").fn(y, x) if reverse1 else op1.fn(x, y))


def activation(dst: Tensor, op: Operator, data: Tensor, bias=None, scale=1.0) -> None:
    """dst = op(data * scale + bias) on the Scalar Engine, in fp32.

    https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.isa.activation.html; scale is a
    scalar or a [P, 1] vector, bias a [P, 1] vector; the op's valid input range is in "Supported Activation
    Functions for NKI ISA" (https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/nki.api.shared.html).
    The hardware evaluates activations with piece-wise polynomials; NumPy here is exact.
    """
    check_buffer(dst, ON_CHIP, "activation dst")
    check_buffer(data, ON_CHIP, "activation data")
    require(isinstance(op, Operator) and op.kind == "act", f"activation op must be an activation function, got {op!r}")
    require(dst.shape == data.shape, f"activation: shapes {data.shape} -> {dst.shape}")
    x = data.data.astype(np.float32) * _operand(scale, data, "activation scale")
    if bias is not None:
        require(isinstance(bias, Tensor), "activation bias is a [P, 1] tensor here")
        x = x + _operand(bias, data, "activation bias")
    finite = x[~np.isnan(x)]
    require(finite.size == 0 or (finite.min() >= op.valid[0] and finite.max() <= op.valid[1]),
            f"activation {op}: input outside the valid range {op.valid}")
    _write(dst, op.fn(x))


def tensor_copy(dst: Tensor, src: Tensor) -> None:
    """dst = src within SBUF/PSUM (an fp32 cast when the dtypes differ).

    https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.isa.tensor_copy.html
    """
    check_buffer(dst, ON_CHIP, "tensor_copy dst")
    check_buffer(src, ON_CHIP, "tensor_copy src")
    _same_lanes(dst, src, what="tensor_copy")
    require(dst.shape == src.shape, f"tensor_copy: shapes {src.shape} -> {dst.shape}")
    _write(dst, src.data)


def memset(dst: Tensor, value) -> None:
    """Fill dst with a compile-time constant whose type matches dst.dtype (strict since NKI 0.3.0).

    https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/nki.isa.memset.html
    """
    check_buffer(dst, ON_CHIP, "memset dst")
    require(isinstance(value, float) if dst.dtype.kind == "f" else isinstance(value, int),
            f"memset: value {value!r} does not match dst dtype {dst.dtype}")
    dst.data[...] = value


def dma_copy(dst: Tensor, src: Tensor) -> None:
    """Copy between HBM and SBUF (either direction, or within one) on the DMA engines.

    https://awsdocs-neuron.readthedocs-hosted.com/general/nki/api/generated/nki.isa.dma_copy.html; since NKI 0.3.0
    it no longer reads PSUM (copy to SBUF first: NKI 0.3.0 Update Guide). No casting and same shapes here.
    """
    for t, name in ((dst, "dst"), (src, "src")):
        check_buffer(t, (sbuf,) + HBM, f"dma_copy {name}")
    require(dst.shape == src.shape, f"dma_copy: shapes {src.shape} -> {dst.shape}")
    require(dst.dtype == src.dtype, f"dma_copy: dtypes {src.dtype} -> {dst.dtype}")
    dst.data[...] = src.data

