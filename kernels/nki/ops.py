"""Host wrappers: the torch kernels' signatures and layouts in, the NKI kernels' layouts and constants out.

Done here, on the host, rather than in the kernels: the q/k L2 norm and K^-1/2 scale (the same
`prepare_qk` as the torch kernels; on trn2 the compiler fuses it into the q/k projection epilogue),
the cast to fp32, the [B, T, H, D] -> [B*H, T, D] layout, and padding T to a multiple of C.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qwenpd.kernels.gated_delta_rule.checks import check_sequence_inputs, check_step_inputs, prepare_qk
from qwenpd.kernels.nki.backend import load_kernels, resolve_mode, run_kernel
from qwenpd.kernels.nki.layout import MAX_HEAD_DIM, C, constants


def _check_head_dims(dk: int, dv: int) -> None:
    if not (1 <= dk <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM):
        raise ValueError(f"the NKI DeltaNet kernels take K, V <= {MAX_HEAD_DIM}, got K={dk}, V={dv}")


def _np(x: Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _heads_first(x: Tensor, t_pad: int) -> np.ndarray:
    """[B, T, H, D] -> [B*H, t_pad, D] fp32, zero-padded along T."""
    batch, seq, heads, dim = x.shape
    out = torch.zeros(batch, heads, t_pad, dim, dtype=torch.float32)
    out[:, :, :seq] = x.detach().to(device="cpu", dtype=torch.float32).permute(0, 2, 1, 3)
    return out.view(batch * heads, t_pad, dim).numpy()


def nki_chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                               initial_state: Tensor | None = None, use_qk_l2norm: bool = True, *,
                               mode: str | None = None) -> tuple[Tensor, Tensor]:
    """Chunked gated delta rule (prefill) on the NKI kernel; same contract as naive_gated_delta_rule.

    Args:
        q, k: [B, T, Hk, K]. Value head h reads key head h // (Hv // Hk).
        v: [B, T, Hv, V]; g, beta: [B, T, Hv]; initial_state: [B, Hv, K, V] or None (zeros).
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) before q is scaled by K^-1/2.
        mode: "emulator", "simulate", "device" or None (QWENPD_NKI_MODE, else auto); see kernels.nki.backend.

    Returns:
        o [B, T, Hv, V] in v.dtype and the final state [B, Hv, K, V] in float32. Computes in fp32; K, V <= 128.
    """
    group = check_sequence_inputs(q, k, v, g, beta, initial_state, None)
    batch, seq, _, dk = q.shape
    hv, dv = v.shape[2:]
    _check_head_dims(dk, dv)
    if initial_state is None:
        state0 = torch.zeros(batch * hv, dk, dv, dtype=torch.float32)
    else:
        state0 = initial_state.detach().to(device="cpu", dtype=torch.float32).reshape(batch * hv, dk, dv)
    if seq == 0:
        return v.new_zeros(batch, 0, hv, dv), state0.view(batch, hv, dk, dv).clone().to(v.device)

    t_pad = -(-seq // C) * C
    qn, kn = prepare_qk(q, k, torch.float32, use_qk_l2norm)
    arrays = [_heads_first(qn, t_pad), _heads_first(kn, t_pad), _heads_first(v, t_pad),
              _heads_first(g[..., None], t_pad), _heads_first(beta[..., None], t_pad),
              state0.contiguous().numpy(), constants()]
    mode = resolve_mode(mode)
    kernel = load_kernels(mode)["deltanet_chunk"].deltanet_chunk_fwd
    o, state = run_kernel(mode, kernel, arrays, heads_per_key=group)
    o = torch.from_numpy(np.asarray(o)).view(batch, hv, t_pad, dv)[:, :, :seq].permute(0, 2, 1, 3).contiguous()
    state = torch.from_numpy(np.asarray(state)).view(batch, hv, dk, dv)
    return o.to(device=v.device, dtype=v.dtype), state.to(v.device)


def nki_step_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                              use_qk_l2norm: bool = True, *, mode: str | None = None) -> Tensor:
    """One decode step on the NKI kernel; same contract as step_gated_delta_rule.

    Args:
        q, k: [B, Hk, K]; v: [B, Hv, V]; g, beta: [B, Hv];
        state: [B, Hv, K, V] float32, UPDATED IN PLACE.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) before q is scaled by K^-1/2.
        mode: as for nki_chunk_gated_delta_rule.

    Returns:
        o [B, Hv, V] in v.dtype.
    """
    group = check_step_inputs(q, k, v, g, beta, state)
    batch, hk, dk = q.shape
    hv, dv = v.shape[1:]
    _check_head_dims(dk, dv)
    qn, kn = prepare_qk(q, k, torch.float32, use_qk_l2norm)
    arrays = [_np(qn).reshape(batch * hk, dk, 1), _np(kn).reshape(batch * hk, dk, 1),
              _np(v).reshape(batch * hv, 1, dv), _np(g).reshape(batch * hv, 1, 1),
              _np(beta).reshape(batch * hv, 1, 1), _np(state).reshape(batch * hv, dk, dv), constants()]
    mode = resolve_mode(mode)
    kernel = load_kernels(mode)["deltanet_step"].deltanet_step_fwd
    o, new_state = run_kernel(mode, kernel, arrays, heads_per_key=group)
    state.copy_(torch.from_numpy(np.asarray(new_state)).view(batch, hv, dk, dv))
    return torch.from_numpy(np.asarray(o)).view(batch, hv, dv).to(device=v.device, dtype=v.dtype)
