"""Weight-only int8 matmul for decode-step rows: bf16 x times int8 weights with one scale per output row.

`int8_matmul` is the CPU kernel (cpu.cpp, built on first use where the CPU has AVX512-BF16 and AVX512-VBMI:
`available()`); `naive_int8_matmul` is its plain reference. Why a kernel of our own, and what it measured against
aten's weight-only int8 kernel and bf16: docs/performance.md.
"""

from __future__ import annotations

import torch

from qwenpd.kernels.int8_matmul.cpu import load as available
from qwenpd.kernels.int8_matmul.naive import naive_int8_matmul


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, K], q int8 [N, K], scale bf16 [N] -> bf16 [M, N]: each row's fp32 sums in one fixed order (the
    same bits for a row alone or in any batch), times its scale, rounded once. Only where `available()`."""
    if not available():
        raise RuntimeError("the int8 CPU kernel is not available here (kernels/int8_matmul/cpu.py says why)")
    return torch.ops.qwenpd_int8.int8_matmul(x, q, scale)


__all__ = ["available", "int8_matmul", "naive_int8_matmul"]
