"""The plain reference of the weight-only int8 matmul: y = (x @ q^T) * scale, sums in float64, rounded once."""

from __future__ import annotations

import torch


def naive_int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16), q int8 [N, K], scale [N] -> [M, N] in x's dtype: sum_k x[m, k] q[n, k] in float64 (exact
    for these sizes), times scale[n], rounded once to x's dtype."""
    return ((x.double() @ q.double().T) * scale.double()).to(x.dtype)
