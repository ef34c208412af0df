"""Weight-only int8 matmul for decode-step rows: bf16 x times int8 weights with one scale per output row.

`int8_matmul` is the CPU kernel: amx.cpp where the CPU has AMX-BF16, else cpu.cpp (built on first use where the
CPU has AVX512-BF16 and AVX512-VBMI: `available()`; `kernel()` says which); `naive_int8_matmul` is their plain
reference. Why kernels of our own, and what they measured against aten's weight-only int8 kernel and bf16:
docs/performance.md.
"""

from __future__ import annotations

import torch

from qwenpd.kernels.int8_matmul.cpu import kernel, load as available
from qwenpd.kernels.int8_matmul.naive import naive_int8_matmul


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, K], q int8 [N, K], scale bf16 [N] -> bf16 [M, N]: each row's fp32 sums in one fixed order (the
    same bits for a row alone or in any batch of the same kernel), times its scale, rounded once. Only where
    `available()`."""
    which = kernel()
    if which is None:
        raise RuntimeError("the int8 CPU kernel is not available here (kernels/int8_matmul/cpu.py says why)")
    if which == "amx":
        return torch.ops.qwenpd_int8_amx.int8_matmul(x, q, scale)
    return torch.ops.qwenpd_int8.int8_matmul(x, q, scale)


__all__ = ["available", "int8_matmul", "kernel", "naive_int8_matmul"]
