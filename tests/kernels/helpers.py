"""Shared helpers for kernel tests: a strict closeness check and seeded Gated DeltaNet inputs."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}


def assert_close(actual: Tensor, expected: Tensor, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """Fail on NaN/inf or on any |a - e| > atol + rtol |e|; the message gives max-abs and relative error."""
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for name, t in (("actual", a), ("expected", e)):
        bad = ~torch.isfinite(t)
        if bad.any():
            raise AssertionError(f"{label}{name} has {int(torch.isnan(t).sum())} NaN and "
                                 f"{int(torch.isinf(t).sum())} inf of {t.numel()} values")
    if a.numel() == 0:
        return
    err = (a - e).abs()
    rel = err / e.abs().clamp_min(1e-30)
    worst = int(torch.argmax(err - rtol * e.abs()))
    excess = err - (atol + rtol * e.abs())
    if (excess > 0).any():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{label}{int((excess > 0).sum())}/{a.numel()} values off: max abs err {err.max().item():.3e}, "
            f"max rel err {rel.max().item():.3e} (atol {atol:.1e}, rtol {rtol:.1e}); worst at {index}: "
            f"{a[index].item():.6e} vs {e[index].item():.6e}")


def padding_mask(batch: int, seq: int, generator: torch.Generator) -> Tensor:
    """[B, T] bool: row 0 left-padded, row 1 right-padded, further rows random holes; True = real token."""
    mask = torch.ones(batch, seq, dtype=torch.bool)
    left = int(torch.randint(0, seq // 2 + 1, (1,), generator=generator))
    mask[0, :left] = False
    if batch > 1:
        right = int(torch.randint(0, seq // 2 + 1, (1,), generator=generator))
        mask[1, seq - right:] = False
    if batch > 2:
        mask[2:] = torch.rand(batch - 2, seq, generator=generator) > 0.3
    return mask


def gdn_inputs(batch: int, seq: int, hk: int, hv: int, dk: int, dv: int, dtype: torch.dtype = torch.float32,
               seed: int = 0, g_range: tuple[float, float] = (-2.0, -0.01), with_state: bool = False,
               with_mask: bool = False) -> dict:
    """Seeded kwargs for the gated delta rule: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv] (fp32 g like
    the model computes it; beta = sigmoid); optional fp32 initial_state [B, Hv, K, V] and padding mask [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = g_range
    inputs = dict(
        q=torch.randn(batch, seq, hk, dk, generator=gen).to(dtype),
        k=torch.randn(batch, seq, hk, dk, generator=gen).to(dtype),
        v=torch.randn(batch, seq, hv, dv, generator=gen).to(dtype),
        g=torch.rand(batch, seq, hv, generator=gen) * (hi - lo) + lo,
        beta=torch.randn(batch, seq, hv, generator=gen).sigmoid().to(dtype),
        initial_state=torch.randn(batch, hv, dk, dv, generator=gen) * 0.5 if with_state else None,
        mask=padding_mask(batch, seq, gen) if with_mask else None,
    )
    if dtype == torch.float64:
        inputs["g"] = inputs["g"].double()
        if with_state:
            inputs["initial_state"] = inputs["initial_state"].double()
    return inputs
