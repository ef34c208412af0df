"""Reference causal depthwise conv: pad with the carried state, then one explicit term per tap."""

from __future__ import annotations

import torch
from torch import Tensor

from qwenpd.kernels.causal_conv1d.checks import accumulate_dtype, check_conv_inputs, finish


def naive_causal_conv1d(x: Tensor, weight: Tensor, state: Tensor | None = None,
                        activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over a sequence, continuing from `state`.

    Args:
        x: [B, T, D] token-major inputs.
        weight: [D, W] depthwise kernel (HF's conv1d.weight.squeeze(1)); no bias.
        state: [B, D, W-1] the previous W-1 inputs, oldest first; None = zeros.
        activation: "silu" or None.

    y[b, t, d] = act(sum_i weight[d, i] * xp[b, d, t + i]) with xp = [state, x^T] along time, computed in the
    weight dtype like HF (inputs cast to it, sums rounded to it once).

    Returns:
        y [B, T, D] in x.dtype and the new state [B, D, W-1] = the last W-1 columns of xp (state.dtype, else x.dtype).
    """
    check_conv_inputs(x, weight, state, activation, token_dims=2)
    batch, seq, dim = x.shape
    width = weight.shape[1]
    if state is None:
        state = x.new_zeros(batch, dim, width - 1)
    acc_dtype = accumulate_dtype(weight)
    # HF casts inputs to the weight dtype before the conv; the sums are exact-ish in fp32 and rounded once.
    xp = torch.cat([state.to(weight.dtype), x.transpose(1, 2).to(weight.dtype)], dim=-1).to(acc_dtype)  # [B, D, W-1+T]
    w = weight.to(acc_dtype)

    acc = torch.zeros(batch, dim, seq, dtype=acc_dtype, device=x.device)
    for i in range(width):
        acc += w[:, i, None] * xp[:, :, i:i + seq]
    y = finish(acc, weight, activation, x.dtype).transpose(1, 2).contiguous()
    new_state = torch.cat([state, x.transpose(1, 2).to(state.dtype)], dim=-1)[:, :, seq:]
    return y, new_state.contiguous()
