"""Input checks and q/k preparation shared by the naive, chunked and single-step gated delta rule."""

from __future__ import annotations

import torch
from torch import Tensor

L2NORM_EPS = 1e-6


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_float(name: str, x: Tensor) -> None:
    _require(x.is_floating_point(), f"{name} must be a floating-point tensor, got {x.dtype}")


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 when any input is float64 (reference checks), float32 otherwise: the state is never lower."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def check_sequence_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                          initial_state: Tensor | None, mask: Tensor | None) -> int:
    """Validate [B, T, H, D] inputs of the whole-sequence kernels; returns Hv // Hk."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _require_float(name, x)
    _require(q.ndim == 4, f"q must be [B, T, Hk, K], got shape {tuple(q.shape)}")
    _require(k.shape == q.shape, f"k must match q {tuple(q.shape)}, got {tuple(k.shape)}")
    _require(v.ndim == 4 and v.shape[:2] == q.shape[:2],
             f"v must be [B, T, Hv, V] with B, T = {tuple(q.shape[:2])}, got {tuple(v.shape)}")
    batch, seq, hk, dk = q.shape
    hv, dv = v.shape[2:]
    _require(hk > 0 and hv % hk == 0, f"value heads ({hv}) must be a multiple of key heads ({hk})")
    for name, x in (("g", g), ("beta", beta)):
        _require(x.shape == (batch, seq, hv), f"{name} must be [B, T, Hv] = {(batch, seq, hv)}, got {tuple(x.shape)}")
    if initial_state is not None:
        _require_float("initial_state", initial_state)
        _require(initial_state.shape == (batch, hv, dk, dv),
                 f"initial_state must be [B, Hv, K, V] = {(batch, hv, dk, dv)}, got {tuple(initial_state.shape)}")
    if mask is not None:
        _require(mask.dtype == torch.bool, f"mask must be bool (True = real token), got {mask.dtype}")
        _require(mask.shape == (batch, seq), f"mask must be [B, T] = {(batch, seq)}, got {tuple(mask.shape)}")
    return hv // hk


def check_step_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> int:
    """Validate [B, H, D] single-token inputs and the fp32 state updated in place; returns Hv // Hk."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _require_float(name, x)
    _require(q.ndim == 3, f"q must be [B, Hk, K], got shape {tuple(q.shape)}")
    _require(k.shape == q.shape, f"k must match q {tuple(q.shape)}, got {tuple(k.shape)}")
    _require(v.ndim == 3 and v.shape[0] == q.shape[0],
             f"v must be [B, Hv, V] with B = {q.shape[0]}, got {tuple(v.shape)}")
    batch, hk, dk = q.shape
    hv, dv = v.shape[1:]
    _require(hk > 0 and hv % hk == 0, f"value heads ({hv}) must be a multiple of key heads ({hk})")
    for name, x in (("g", g), ("beta", beta)):
        _require(x.shape == (batch, hv), f"{name} must be [B, Hv] = {(batch, hv)}, got {tuple(x.shape)}")
    _require(state.dtype == torch.float32, f"state must be float32 (updated in place), got {state.dtype}")
    _require(state.shape == (batch, hv, dk, dv),
             f"state must be [B, Hv, K, V] = {(batch, hv, dk, dv)}, got {tuple(state.shape)}")
    return hv // hk


def inv_l2norm(x: Tensor) -> Tensor:
    """rsqrt(sum(x^2) + 1e-6) over the last dim, as [..., 1] (transformers' / FLA's l2norm factor)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(L2NORM_EPS).rsqrt_()


def prepare_qk(q: Tensor, k: Tensor, dtype: torch.dtype, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    """Cast to the compute dtype, optionally L2-normalise over the last dim, scale q by K^-1/2 (key heads kept)."""
    q, k = q.to(dtype), k.to(dtype)
    scale = q.shape[-1] ** -0.5
    if use_qk_l2norm:
        return q * (inv_l2norm(q) * scale), k * inv_l2norm(k)
    return q * scale, k
