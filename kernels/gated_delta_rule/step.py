"""Single-token gated delta rule for decode: the whole batch in a few batched matmuls, state updated in place."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from qwenpd.kernels.gated_delta_rule import cpu
from qwenpd.kernels.gated_delta_rule.checks import check_step_inputs, prepare_qk


def step_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                          use_qk_l2norm: bool = True) -> Tensor:
    """Advance every sequence of a batch by one token.

    Args:
        q, k: [B, Hk, K]. Value head h reads key head h // (Hv // Hk).
        v: [B, Hv, V].
        g: [B, Hv] log decay (<= 0). beta: [B, Hv] write strength.
        state: [B, Hv, K, V] float32, UPDATED IN PLACE.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) before q is scaled by K^-1/2.

    Returns:
        o [B, Hv, V] in v.dtype; same result as naive_gated_delta_rule on a one-token sequence.
    """
    check_step_inputs(q, k, v, g, beta, state)
    return step_state(step_inputs(q, k, v, g, beta, use_qk_l2norm), state)


class StepInputs(NamedTuple):
    """The per-token part of a step (no state read): `step_inputs` of a batch of tokens, rows selectable, so that
    several tokens of one sequence (speculative decoding's verify pass) prepare at once and step one at a time."""

    qk: Tensor  # [B, Hv, 2, K] fp32: k and q (l2-normalised, q scaled), repeated to the value heads
    k: Tensor  # [B, Hv, K]
    qdotk: Tensor  # [B, Hv, 1]
    decay: Tensor  # [B, Hv, 1] e^g
    beta: Tensor  # [B, Hv, 1] fp32
    v: Tensor  # [B, Hv, V] fp32
    out_dtype: torch.dtype

    def rows(self, index) -> "StepInputs":
        return StepInputs(*(t[index] for t in self[:-1]), self.out_dtype)


def step_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, use_qk_l2norm: bool = True
                ) -> StepInputs:
    """step_gated_delta_rule's work before it reads the state (arguments as there, unchecked): row by row the
    same bits whatever the rows beside them."""
    group = v.shape[1] // q.shape[1]
    q, k = prepare_qk(q, k, torch.float32, use_qk_l2norm)
    q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)  # [B, Hv, K]
    decay = g.float().exp()[..., None]  # [B, Hv, 1]
    qk = torch.stack([k, q], dim=2)  # [B, Hv, 2, K]
    return StepInputs(qk, k, (q * k).sum(-1, keepdim=True), decay, beta.float()[..., None], v.float(), v.dtype)


def _on_kernel(state: Tensor) -> bool:
    """Whether cpu_step.cpp's ops take this state: a contiguous CPU one, the kernel loaded (loaded on first use, not
    while torch.compile traces)."""
    return (state.device.type == "cpu" and state.is_contiguous()
            and (cpu.ready or (not torch.compiler.is_compiling() and cpu.load())))


def step_state(x: StepInputs, state: Tensor) -> Tensor:
    """step_gated_delta_rule's state part: one token per row of `x` into state [B, Hv, K, V] (in place). On CPU the
    kernel of cpu_step.cpp (loaded on first use; an engine loads it at start): one pass over the state, ~2x
    step_state_torch at batch 8 here; elsewhere, or without a compiler, step_state_torch."""
    if _on_kernel(state):
        return torch.ops.qwenpd_delta.step_state(x.qk, x.qdotk, x.decay, x.beta, x.v, state).to(x.out_dtype)
    return step_state_torch(x, state)


def step_states(x: StepInputs, state: Tensor, slots: list[int], offsets: list[int], counts: list[int],
                snaps: Tensor | None = None) -> Tensor:
    """Several tokens of each of several sequences, one after another: rows offsets[b] .. offsets[b]+counts[b]-1 of
    `x` into state[slots[b]] (in place), every row's output and state the bits step_state gives it when the rows
    go one step at a time (speculative decoding's verify pass, and its replay of accepted tokens). `snaps`
    [R, Hv, K, V] fp32: row r's place gets the state after row r, for every row but its sequence's last. Returns
    [R, Hv, V] in x's out_dtype, zeros in rows no sequence reads. Slots must be distinct and row ranges disjoint.
    On CPU the kernel of cpu_step.cpp (one call, each head's state read from memory once for all its tokens),
    elsewhere step_states_torch."""
    if _on_kernel(state):
        empty = state.new_empty(0) if snaps is None else snaps
        return torch.ops.qwenpd_delta.step_states(x.qk, x.qdotk, x.decay, x.beta, x.v, state, slots, offsets, counts,
                                                  empty).to(x.out_dtype)
    return step_states_torch(x, state, slots, offsets, counts, snaps)


def step_states_torch(x: StepInputs, state: Tensor, slots: list[int], offsets: list[int], counts: list[int],
                      snaps: Tensor | None = None) -> Tensor:
    """step_states one row at a time with step_state_torch: its plain reference."""
    out = x.v.new_zeros(x.v.shape)
    for slot, lo, n in zip(slots, offsets, counts):
        for r in range(lo, lo + n):
            out[r] = step_state_torch(x.rows(slice(r, r + 1)), state[slot:slot + 1])[0]
            if snaps is not None and r + 1 < lo + n:
                snaps[r].copy_(state[slot])
    return out.to(x.out_dtype)


def step_state_torch(x: StepInputs, state: Tensor) -> Tensor:
    """step_state in torch ops: the reference of cpu_step.cpp and the code of every other device."""
    # Read the old state once for both k and q (S is the largest tensor here; it bounds decode):
    #   k^T (e^g S) = e^g (k^T S)   and   q^T S' = e^g (q^T S) + (q . k) delta
    reads = (x.qk @ state).mul_(x.decay[..., None])  # [B, Hv, 2, V]
    delta = x.beta * (x.v - reads[:, :, 0])  # [B, Hv, V]
    out = reads[:, :, 1] + x.qdotk * delta

    state.mul_(x.decay[..., None]).addcmul_(x.k[..., :, None], delta[..., None, :])
    return out.to(x.out_dtype)
