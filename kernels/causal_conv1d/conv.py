"""Causal depthwise conv for prefill (a chunk of tokens, token-major) and decode (one token, state in place).

The chunk version walks the tokens in blocks of about 2 MiB of fp32: each block is [previous W-1 inputs, block]
in the accumulate dtype, and every tap is one in-place multiply-add of a shifted slice of it. Small blocks keep
the temporaries in cache and avoid mixed-dtype slow paths; whole-sequence fp32 temporaries cost more on CPU
(fresh pages) than the arithmetic. On accelerators the whole chunk is one block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qwenpd.kernels.causal_conv1d.checks import accumulate_dtype, check_conv_inputs, finish

BLOCK_ELEMENTS = 1 << 19  # per block of tokens on CPU: 2 MiB of fp32


def causal_conv1d(x: Tensor, weight: Tensor, state: Tensor | None = None,
                  activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over a chunk of tokens, continuing from `state` (the prefill path).

    Args:
        x: [B, T, D] token-major inputs.
        weight: [D, W] depthwise kernel (HF's conv1d.weight.squeeze(1)); no bias.
        state: [B, D, W-1] the previous W-1 inputs, oldest first; None = zeros. Not modified.
        activation: "silu" or None.

    Returns:
        y [B, T, D] in x.dtype and the new state [B, D, W-1]: the last W-1 inputs of [state, x] (right also for
        T < W-1), in state.dtype (x.dtype when state is None). Same as naive_causal_conv1d.
    """
    check_conv_inputs(x, weight, state, activation, token_dims=2)
    batch, seq, dim = x.shape
    width = weight.shape[1]
    acc_dtype = accumulate_dtype(weight)
    taps = weight.to(acc_dtype).t().contiguous()  # [W, D]; tap W-1 multiplies the current token
    if state is None:
        prev = x.new_zeros(batch, width - 1, dim, dtype=acc_dtype)
    else:
        prev = state.transpose(1, 2).to(weight.dtype).to(acc_dtype)  # [B, W-1, D]
    block = seq if x.device.type != "cpu" else max(1, BLOCK_ELEMENTS // (batch * dim))

    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    for start in range(0, seq, block):
        n = min(block, seq - start)
        window = torch.cat([prev, x[:, start:start + n].to(weight.dtype).to(acc_dtype)], dim=1)  # [B, W-1+n, D]
        acc = window[:, width - 1:] * taps[-1]
        for i in range(width - 1):
            acc.addcmul_(window[:, i:i + n], taps[i])
        y[:, start:start + n] = finish(acc, weight, activation, x.dtype)
        prev = window[:, n:]
    return y, _next_state(x, state, width)


def _next_state(x: Tensor, state: Tensor | None, width: int) -> Tensor:
    """The last W-1 inputs of [state, x] as [B, D, W-1]."""
    batch, seq, dim = x.shape
    keep = width - 1
    dtype = x.dtype if state is None else state.dtype
    if seq >= keep:
        return x[:, seq - keep:].transpose(1, 2).to(dtype, memory_format=torch.contiguous_format, copy=True)
    if state is None:
        state = x.new_zeros(batch, dim, keep)
    return torch.cat([state[:, :, seq:], x.transpose(1, 2).to(dtype)], dim=-1)


def causal_conv1d_update(x: Tensor, weight: Tensor, state: Tensor, activation: str | None = "silu") -> Tensor:
    """One token per sequence (the decode path).

    Args:
        x: [B, D] the new token of each sequence.
        weight: [D, W] depthwise kernel.
        state: [B, D, W-1] the previous W-1 inputs, oldest first; UPDATED IN PLACE (shifted left, x appended).
        activation: "silu" or None.

    Returns:
        y [B, D] in x.dtype, equal to causal_conv1d on a one-token chunk (same summation order).
    """
    if state is None:
        raise ValueError("causal_conv1d_update needs the state [B, D, W-1] to update in place")
    check_conv_inputs(x, weight, state, activation, token_dims=1)
    width = weight.shape[1]
    acc_dtype = accumulate_dtype(weight)
    taps = weight.to(acc_dtype).t()  # [W, D]
    past = state.to(weight.dtype)  # [B, D, W-1]

    acc = x.to(weight.dtype).to(acc_dtype, copy=True).mul_(taps[-1])  # [B, D]
    for i in range(width - 1):
        acc.addcmul_(past[:, :, i], taps[i])
    state.copy_(torch.cat([state[:, :, 1:], x.to(state.dtype)[:, :, None]], dim=-1))
    return finish(acc, weight, activation, x.dtype)


def causal_conv1d_update_many(x: Tensor, weight: Tensor, states: list[Tensor], lengths: list[int],
                              activation: str | None = "silu") -> tuple[Tensor, list[Tensor]]:
    """Several tokens of each of several sequences at once, each token's output the bits causal_conv1d_update gives
    it token after token (speculative decoding's verify pass). x [R, D]: lengths[b] consecutive rows per sequence,
    then any padding rows (their outputs are garbage); states[b] [D, W-1] its previous W-1 inputs (not modified).

    Returns y [R, D] in x.dtype and each sequence's history [D, W-1+lengths[b]] in its state's dtype: the state
    after its first t tokens is history[:, t:t+W-1] (what causal_conv1d_update would have left there)."""
    width = weight.shape[1]
    acc_dtype = accumulate_dtype(weight)
    taps = weight.to(acc_dtype).t()  # [W, D]
    histories, windows, lo = [], [], 0
    for state, n in zip(states, lengths):
        history = torch.cat([state, x[lo:lo + n].to(state.dtype).t()], dim=-1)  # [D, W-1+n]
        histories.append(history)
        windows.append(history.to(weight.dtype).unfold(1, width - 1, 1)[:, :n].transpose(0, 1))  # [n, D, W-1]
        lo += n
    if lo < x.shape[0]:
        windows.append(x.new_zeros((x.shape[0] - lo, x.shape[1], width - 1), dtype=weight.dtype))
    past = torch.cat(windows).contiguous()  # [R, D, W-1]: laid out as causal_conv1d_update's `past`
    acc = x.to(weight.dtype).to(acc_dtype, copy=True).mul_(taps[-1])  # [R, D]
    for i in range(width - 1):
        acc.addcmul_(past[:, :, i], taps[i])
    return finish(acc, weight, activation, x.dtype), histories
