"""The plain reference of the AMX projection: y = x @ w^T, summed in float64, rounded once to bf16."""

from __future__ import annotations

import torch


def naive_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] and w [N, K] (bf16) -> [M, N] bf16: the exact sum (float64 is exact for these sizes' products and
    close enough for their sums), rounded once."""
    return (x.double() @ w.double().T).to(torch.bfloat16)
