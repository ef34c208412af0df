"""Single-token gated delta rule for decode: the whole batch in a few batched matmuls, state updated in place."""

from __future__ import annotations

import torch
from torch import Tensor

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
    group = check_step_inputs(q, k, v, g, beta, state)
    batch, hv, dk, dv = state.shape
    q, k = prepare_qk(q, k, torch.float32, use_qk_l2norm)
    q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)  # [B, Hv, K]
    decay = g.float().exp()[..., None]  # [B, Hv, 1]

    # Read the old state once for both k and q (S is the largest tensor here; it bounds decode):
    #   k^T (e^g S) = e^g (k^T S)   and   q^T S' = e^g (q^T S) + (q . k) delta
    qk = torch.stack([k, q], dim=2)  # [B, Hv, 2, K]
    reads = (qk @ state).mul_(decay[..., None])  # [B, Hv, 2, V]
    delta = beta.float()[..., None] * (v.float() - reads[:, :, 0])  # [B, Hv, V]
    out = reads[:, :, 1] + (q * k).sum(-1, keepdim=True) * delta

    state.mul_(decay[..., None]).addcmul_(k[..., :, None], delta[..., None, :])
    return out.to(v.dtype)
