"""Reference gated delta rule: one token at a time, in fp32 (fp64 for fp64 inputs). Slow and obviously right."""

from __future__ import annotations

import torch
from torch import Tensor

from qwenpd.kernels.gated_delta_rule.checks import check_sequence_inputs, compute_dtype, prepare_qk


def naive_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           initial_state: Tensor | None = None, mask: Tensor | None = None,
                           use_qk_l2norm: bool = True) -> tuple[Tensor, Tensor]:
    """Gated delta rule by an explicit loop over tokens.

    Args:
        q, k: [B, T, Hk, K]. Value head h reads key head h // (Hv // Hk).
        v: [B, T, Hv, V].
        g: [B, T, Hv] log decay (<= 0). beta: [B, T, Hv] write strength.
        initial_state: [B, Hv, K, V], any float dtype; None = zeros.
        mask: [B, T] bool, True = real token. A masked token leaves the state alone and outputs zero.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) before q is scaled by K^-1/2.

    Per token t and value head h, with S [K, V]:
        S = S * exp(g_t);  delta = beta_t * (v_t - k_t^T S);  S = S + k_t delta^T;  o_t = q_t^T S

    Returns:
        o [B, T, Hv, V] in v.dtype and the final state [B, Hv, K, V] in float32 (float64 for float64 inputs).
    """
    group = check_sequence_inputs(q, k, v, g, beta, initial_state, mask)
    dtype = compute_dtype(q, k, v)
    batch, seq, hv, dv = v.shape
    dk = q.shape[-1]
    q, k = prepare_qk(q, k, dtype, use_qk_l2norm)
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)  # [B, T, Hv, K]
    values, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)
    if mask is not None:
        keep = mask[..., None]  # g = 0 and beta = 0: the state passes through unchanged
        g, beta = g * keep, beta * keep

    if initial_state is None:
        state = torch.zeros(batch, hv, dk, dv, dtype=dtype, device=v.device)
    else:
        state = initial_state.to(dtype=dtype, copy=True)
    out = torch.zeros(batch, seq, hv, dv, dtype=dtype, device=v.device)
    for t in range(seq):
        state = state * g[:, t].exp()[:, :, None, None]
        kv = torch.einsum("bhk,bhkv->bhv", k[:, t], state)  # [B, Hv, V]
        delta = beta[:, t, :, None] * (values[:, t] - kv)
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], state)
    if mask is not None:
        out = out * mask[:, :, None, None]
    return out.to(v.dtype), state
