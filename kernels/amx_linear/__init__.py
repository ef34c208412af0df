"""bf16 projections on AMX tiles, batch invariant by construction (amx.cpp): `pack_weight` once, `amx_linear` every
call, where `available()` (a CPU with AMX-BF16: kernels/amx_linear/cpu.py); `naive_linear` is the plain reference.
Why, and what it measured against oneDNN: docs/performance.md."""

from __future__ import annotations

import math

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


def pack_int8_weight(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] (|q| <= 127) -> int8 [ceil(N/16), ceil(K/32), 16, 32]: pack_weight's layout, each 64 values
    in the order amx.cpp's byte-table conversion puts back in place (its unpacklo/unpackhi interleave the 16-byte
    lanes: output d = 32 ii + 2 c + j of a 64 comes from byte 16 (c // 4) + 8 ii + 2 (c % 4) + j). One permuted
    copy, no temporary of the weight's size beyond it (a load packs every int8 projection)."""
    n, k = q.shape
    np_, kp = -(-n // 16) * 16, -(-k // 32) * 32
    if (np_, kp) != (n, k):
        q = F.pad(q, (0, kp - k, 0, np_ - n))
    # q[16 nb + 4 ch + cl, 32 kb + 4 ih + 2 ii + j] -> [nb, kb, ih, ch, ii, cl, j]
    return q.reshape(np_ // 16, 4, 4, kp // 32, 8, 2, 2).permute(0, 3, 4, 1, 5, 2, 6) \
        .reshape(np_ // 16, kp // 32, 16, 32).contiguous()


def amx_linear_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """x bf16 [..., K] times the int8 weight `packed` holds (pack_int8_weight of q [n, K]) with one bf16 scale per
    output -> bf16 [..., n]: each output's fp32 sum of x q in a fixed order, times its scale in fp32, rounded to
    bf16 (the same bits for a row alone or among any rows). Only where `available()`."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    kp = packed.shape[1] * 32
    if rows.shape[1] != kp:
        rows = F.pad(rows, (0, kp - rows.shape[1]))
    y = torch.ops.qwenpd_amx.linear_int8(rows.contiguous(), packed, scale.contiguous(), n)
    return y.reshape(*x.shape[:-1], n)


def amx_linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x bf16 [..., K] times the weight `packed` holds ([n, K] before packing) -> bf16 [..., n]: each output one
    fp32 sum in a fixed order (the same bits for a row alone or among any rows), rounded once. Only where
    `available()`."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    kp = packed.shape[1] * 32
    if rows.shape[1] != kp:
        rows = F.pad(rows, (0, kp - rows.shape[1]))
    y = torch.ops.qwenpd_amx.linear(rows.contiguous(), packed, n)
    return y.reshape(*x.shape[:-1], n)


__all__ = ["amx_linear", "amx_linear_int8", "available", "naive_linear", "pack_int8_weight", "pack_weight"]
