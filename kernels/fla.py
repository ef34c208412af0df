"""flash-linear-attention's Triton kernels as the CUDA implementation of the DeltaNet ops (optional package).

kernels/ops.py wraps the chunked one as the op qwenpd::fla_chunk_gated_delta_rule, which an engine uses with
deltanet_kernels="fla"; the torch ops stay the reference and the default. `fla_step` (FLA's fused recurrent step)
is kept only for `check_equal`: on an H200 with FLA 0.6.0 its state diverged from the reference, so decode steps
use the torch op. FLA's kernels take value heads equal to key heads, so
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


def check_equal(device: str = "cuda", steps: int = 20) -> tuple[float, float]:
    """Max-abs differences of FLA against the torch kernels on random inputs: (a 100-token chunk's output and final
    state, then `steps` of FLA's own recurrent step from that state). Used by tests and check-device."""
    from qwenpd.kernels.gated_delta_rule import chunk_gated_delta_rule, step_gated_delta_rule

    gen = torch.Generator().manual_seed(0)
    b, t, hk, hv, d = 2, 100 + steps, 2, 4, 64
    q, k = (torch.randn(b, t, hk, d, generator=gen) for _ in range(2))
    v = torch.randn(b, t, hv, d, generator=gen)
    g = -torch.rand(b, t, hv, generator=gen)
    beta = torch.rand(b, t, hv, generator=gen)
    s0 = torch.randn(b, hv, d, d, generator=gen) * 0.1
    n = t - steps
    ref_o, ref_s = chunk_gated_delta_rule(q[:, :n], k[:, :n], v[:, :n], g[:, :n], beta[:, :n], initial_state=s0)
    dev = [x.to(device) for x in (q, k, v, g, beta, s0)]
    o, s = fla_chunk(*(x[:, :n] for x in dev[:5]), dev[5])
    chunk_err = max((o.float().cpu() - ref_o).abs().max().item(), (s.cpu() - ref_s).abs().max().item())
    step_err = 0.0
    s = ref_s.to(device)  # the steps start from the same state
    for i in range(n, t):
        ref = step_gated_delta_rule(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], ref_s)
        out = fla_step(*(x[:, i] for x in dev[:5]), s)
        step_err = max(step_err, (out.float().cpu() - ref).abs().max().item(), (s.cpu() - ref_s).abs().max().item())
    return chunk_err, step_err
