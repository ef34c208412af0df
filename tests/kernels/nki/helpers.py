"""Inputs and comparisons shared by the NKI kernel tests."""

from __future__ import annotations

import torch
from torch import Tensor


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (a norm-wise bound: fp32 rounding accumulates in absolute
    terms over sums of up to 128 terms, so elementwise relative error is meaningless where outputs cancel)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs()
    max_abs = err.max().item() if err.numel() else 0.0
    rel = err / expected.abs().clamp_min(1e-30)
    assert max_abs <= tol * scale, (
        f"{what}: max abs err {max_abs:.3e} > {tol:.1e} * max|ref| {scale:.3e} "
        f"(norm-wise rel {max_abs / scale:.3e}, elementwise max rel {rel.max().item():.3e})")


def make_inputs(batch: int, seq: int, hk: int, hv: int, dk: int, dv: int, *, seed: int, gates: str = "realistic",
                correlated_keys: bool = False, dtype=torch.float32) -> dict[str, Tensor]:
    """q, k [B, T, Hk, K], v [B, T, Hv, V], g, beta [B, T, Hv] for one gate regime.

    realistic: g = -exp(A_log) * softplus(a + dt_bias), as in the model; mostly within -0.1 .. -3.
    deep:      g around -3 and spikes to -40: cumulative decay below -300 inside a chunk.
    weak:      g = -1e-4: almost no decay, so (I + A) is at its least diagonal-dominant.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(batch, seq, hk, dk), randn(batch, seq, hk, dk), randn(batch, seq, hv, dv)
    if correlated_keys:  # real keys are far from orthogonal: k . k' ~ 0.9 makes the chunk system hard
        k = randn(batch, 1, hk, dk) + 0.3 * k
    if gates == "realistic":
        a_log = torch.empty(hv).uniform_(0.0, 1.0, generator=gen)
        dt_bias = torch.empty(hv).uniform_(-1.0, 0.5, generator=gen)
        g = -a_log.exp() * torch.nn.functional.softplus(randn(batch, seq, hv) + dt_bias)
    elif gates == "deep":
        g = -3.0 + 0.5 * randn(batch, seq, hv).abs().neg()
        g = torch.where(torch.rand(batch, seq, hv, generator=gen) < 0.05, torch.full_like(g, -40.0), g)
    elif gates == "weak":
        g = torch.full((batch, seq, hv), -1e-4)
    else:
        raise ValueError(gates)
    beta = torch.rand(batch, seq, hv, generator=gen).mul(0.5).add(0.5) if correlated_keys else \
        torch.sigmoid(randn(batch, seq, hv))
    out = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    return {name: x.to(dtype) for name, x in out.items()}


def random_state(batch: int, hv: int, dk: int, dv: int, *, seed: int) -> Tensor:
    return 0.1 * torch.randn(batch, hv, dk, dv, generator=torch.Generator().manual_seed(seed))


def as_double(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: x.double() for name, x in inputs.items()}
