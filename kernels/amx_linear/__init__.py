"""bf16 projections on AMX tiles, batch invariant by construction (amx.cpp): `pack_weight` once, `amx_linear` every
call, where `available()` (a CPU with AMX-BF16: kernels/amx_linear/cpu.py); `naive_linear` is the plain reference.
Why, and what it measured against oneDNN: docs/performance.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenpd.kernels.amx_linear.cpu import load as available
from qwenpd.kernels.amx_linear.naive import naive_linear


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w bf16 [N, K] -> the kernel's layout [ceil(N/16), ceil(K/32), 16, 32]: block (nb, kb) holds
    B[i][2c + j] = w[16 nb + c, 32 kb + 2 i + j], zero past N and K."""
    n, k = w.shape
    np_, kp = -(-n // 16) * 16, -(-k // 32) * 32
    w = F.pad(w.to(torch.bfloat16), (0, kp - k, 0, np_ - n))
    # [nb, c, kb, i, j] -> [nb, kb, i, c, j]
    return w.reshape(np_ // 16, 16, kp // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(np_ // 16, kp // 32, 16, 32) \
        .contiguous()


def amx_linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x bf16 [..., K] times the weight `packed` holds ([n, K] before packing) -> bf16 [..., n]: each output one
    fp32 sum in a fixed order (the same bits for a row alone or among any rows), rounded once. Only where
    `available()`."""
    rows = x.reshape(-1, x.shape[-1])
    kp = packed.shape[1] * 32
    if rows.shape[1] != kp:
        rows = F.pad(rows, (0, kp - rows.shape[1]))
    y = torch.ops.qwenpd_amx.linear(rows.contiguous(), packed, n)
    return y.reshape(*x.shape[:-1], n)


__all__ = ["amx_linear", "available", "naive_linear", "pack_weight"]
