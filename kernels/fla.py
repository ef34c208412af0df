"""flash-linear-attention's Triton kernels as the CUDA implementation of the DeltaNet ops (optional package).

`register` adds CUDA kernels to qwenpd::chunk_gated_delta_rule and qwenpd::step_gated_delta_rule when `fla`
imports; otherwise the ops keep the torch code on CUDA. FLA's kernels take value heads equal to key heads, so
q/k are repeated to the value heads first; a masked (padding) token gets g = beta = 0 (state untouched) and a zero
output, the ops' contract. Same math as kernels.gated_delta_rule: L2-normalised q/k, q scaled by K^-1/2.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError:
        return False
    return True


def _heads(q: Tensor, k: Tensor, hv: int) -> tuple[Tensor, Tensor]:
    group = hv // q.shape[-2]
    return q.repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)


def fla_chunk(q, k, v, g, beta, initial_state, mask=None):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    q, k = _heads(q, k, v.shape[-2])
    g, beta = g.float(), beta.to(v.dtype)
    if mask is not None:
        g, beta = g * mask[..., None], beta * mask[..., None]
    o, state = chunk_gated_delta_rule(q.to(v.dtype), k.to(v.dtype), v, g, beta, initial_state=initial_state.float(),
                                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    if mask is not None:
        o = o * mask[..., None, None]
    return o.contiguous(), state.float().contiguous()


def fla_step(q, k, v, g, beta, state):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    q, k = _heads(q, k, v.shape[-2])
    o, new_state = fused_recurrent_gated_delta_rule(
        q[:, None].to(v.dtype), k[:, None].to(v.dtype), v[:, None], g[:, None].float(), beta[:, None].to(v.dtype),
        initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    state.copy_(new_state)
    return o[:, 0].contiguous()


def register(chunk_op, step_op) -> str:
    """Serve the two DeltaNet ops with FLA on CUDA when it imports; returns "fla" or "torch"."""
    if not available():
        log.info("flash-linear-attention is not installed: DeltaNet ops run the torch kernels on CUDA")
        return "torch"
    chunk_op.register_kernel("cuda")(fla_chunk)
    step_op.register_kernel("cuda")(fla_step)
    return "fla"


def check_equal(device: str = "cuda", atol: float = 2e-2) -> float:
    """Max-abs difference of FLA against the torch kernels on random inputs (used by tests and check-device)."""
    from qwenpd.kernels.gated_delta_rule import chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(0)
    b, t, hk, hv, d = 2, 100, 2, 4, 64
    q, k = (torch.randn(b, t, hk, d, generator=gen) for _ in range(2))
    v = torch.randn(b, t, hv, d, generator=gen)
    g = -torch.rand(b, t, hv, generator=gen)
    beta = torch.rand(b, t, hv, generator=gen)
    s0 = torch.randn(b, hv, d, d, generator=gen) * 0.1
    ref_o, ref_s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    dev = [x.to(device) for x in (q, k, v, g, beta, s0)]
    o, s = fla_chunk(*dev)
    return max((o.float().cpu() - ref_o).abs().max().item(), (s.cpu() - ref_s).abs().max().item())
