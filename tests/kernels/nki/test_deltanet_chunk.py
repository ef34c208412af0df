"""NKI chunked gated delta rule (emulator, every run) against the torch reference, naive_gated_delta_rule.

The reference runs in float64 (the same function on float64 inputs) as the oracle; the kernel computes in fp32.
Tolerances are norm-wise: max |err| <= tol * max |ref| (see helpers.assert_close).
- FP32 = 2e-5: unit roundoff 6e-8 grows over sums of up to 128 products per matmul, 16-row substitution
  chains and decay exponents G_i - G_j formed from cumulative sums of |G| up to a few hundred (absolute error
  ~|G| * 6e-8 in the exponent). Measured: 2e-7 .. 4e-6 on these inputs; the fp32 naive loop itself is 4e-7 .. 6e-6.
- BF16 = 8e-3: both sides round the output to bfloat16 (8 significant bits, half-ulp 2^-9 = 2e-3 of the element,
  doubled for two independent roundings and taken against max|ref|).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenpd.kernels.gated_delta_rule import naive_gated_delta_rule
from qwenpd.kernels.nki import nki_chunk_gated_delta_rule
from tests.kernels.nki.helpers import as_double, assert_close, make_inputs, random_state

FP32, BF16 = 2e-5, 8e-3
EMU = {"mode": "emulator"}


def _check(inputs, initial_state=None, tol=FP32):
    o, state = nki_chunk_gated_delta_rule(**inputs, initial_state=initial_state, **EMU)
    ref_o, ref_state = naive_gated_delta_rule(**as_double(inputs),
                                              initial_state=None if initial_state is None else initial_state.double())
    assert o.dtype == inputs["v"].dtype and state.dtype == torch.float32 and o.is_contiguous()
    assert_close(o, ref_o, tol, "o")
    assert_close(state, ref_state, FP32, "final state")


GRID = [pytest.param(t, hk, hv, init, id=f"T{t}-Hk{hk}-Hv{hv}-{'init' if init else 'zero'}")
        for t in (1, 127, 128, 129, 300, 1024) for hk, hv in ((1, 1), (1, 2)) for init in (False, True)]


@pytest.mark.parametrize("seq, hk, hv, init", GRID)
def test_matches_reference(seq, hk, hv, init):
    inputs = make_inputs(1, seq, hk, hv, 128, 128, seed=seq + 10 * hv)
    _check(inputs, random_state(1, hv, 128, 128, seed=seq) if init else None)


@pytest.mark.parametrize("dk, dv", [(16, 32), (48, 24)], ids=["K16-V32", "K48-V24"])
@pytest.mark.parametrize("seq", [129, 300], ids=["T129", "T300"])
def test_small_head_dims(seq, dk, dv):
    inputs = make_inputs(2, seq, 2, 4, dk, dv, seed=dk + dv)
    _check(inputs, random_state(2, 4, dk, dv, seed=1))


@pytest.mark.parametrize("gates, correlated", [("deep", False), ("weak", False), ("weak", True), ("realistic", True)],
                         ids=["deep", "weak", "weak-correlated-keys", "realistic-correlated-keys"])
def test_extreme_gates(gates, correlated):
    inputs = make_inputs(1, 300, 1, 2, 128, 128, seed=3, gates=gates, correlated_keys=correlated)
    if gates == "deep":  # the regime the decay masking exists for: cumulative decay below -300 in a chunk
        assert inputs["g"][:, :128].sum(1).max() < -300
    _check(inputs, random_state(1, 2, 128, 128, seed=4))


def test_bf16_inputs():
    inputs = make_inputs(1, 200, 1, 2, 128, 128, seed=5, dtype=torch.bfloat16)
    state0 = random_state(1, 2, 128, 128, seed=6)
    o, state = nki_chunk_gated_delta_rule(**inputs, initial_state=state0, **EMU)
    ref_o, ref_state = naive_gated_delta_rule(**inputs, initial_state=state0)  # fp32 math on the same bf16 values
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(o, ref_o, BF16, "o (bf16)")
    assert_close(state, ref_state, FP32, "final state")


def test_split_prefill_continues_exactly():
    """Prefill in two calls with the state handed over equals one call: the prefix-cache restore path."""
    inputs = make_inputs(1, 300, 1, 2, 128, 128, seed=7)
    whole_o, whole_state = nki_chunk_gated_delta_rule(**inputs, **EMU)
    first = {name: x[:, :200] for name, x in inputs.items()}
    rest = {name: x[:, 200:] for name, x in inputs.items()}
    o1, mid = nki_chunk_gated_delta_rule(**first, **EMU)
    o2, state = nki_chunk_gated_delta_rule(**rest, initial_state=mid, **EMU)
    assert_close(torch.cat([o1, o2], 1), whole_o, FP32, "o")
    assert_close(state, whole_state, FP32, "state")


def test_empty_sequence_returns_the_initial_state():
    inputs = make_inputs(1, 0, 1, 1, 16, 16, seed=0)
    state0 = random_state(1, 1, 16, 16, seed=0)
    o, state = nki_chunk_gated_delta_rule(**inputs, initial_state=state0, **EMU)
    assert o.shape == (1, 0, 1, 16) and torch.equal(state, state0)


def test_rejects_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="K, V <= 128"):
        nki_chunk_gated_delta_rule(**make_inputs(1, 4, 1, 1, 256, 128, seed=0), **EMU)
    bad = make_inputs(1, 4, 1, 1, 16, 16, seed=0)
    bad["g"] = bad["g"][:, :3]
    with pytest.raises(ValueError, match="g must be"):
        nki_chunk_gated_delta_rule(**bad, **EMU)


def _neumann_inverse(a: np.ndarray) -> np.ndarray:
    """(I + A)^-1 = (I - A)(I + A^2)(I + A^4)...: power doubling over a whole 128-token chunk, in fp32."""
    m = -a
    inv = np.eye(len(a), dtype=np.float32) + m
    for _ in range(6):
        m = m @ m
        inv = inv + inv @ m
    return inv


def test_neumann_doubling_fails_where_the_blocked_solve_passes():
    """One chunk, zero state, near-parallel keys and almost no decay (as in trained models): the powers of A
    reach 1e33 and their cancellation destroys every digit; forward substitution never forms them."""
    c, dk, dv = 128, 128, 128
    inputs = make_inputs(1, c, 1, 1, dk, dv, seed=11, gates="weak", correlated_keys=True)
    o, _ = nki_chunk_gated_delta_rule(**inputs, **EMU)
    ref_o, _ = naive_gated_delta_rule(**as_double(inputs))
    assert_close(o, ref_o, FP32, "blocked solve")

    q = inputs["q"][0, :, 0].double()
    q = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5).float().numpy()
    k = inputs["k"][0, :, 0].double()
    k = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)).float().numpy()
    v, g, beta = (inputs[n][0, :, 0].numpy() for n in ("v", "g", "beta"))
    cum = np.cumsum(g)
    lower, strict = np.tril(np.ones((c, c), bool)), np.tril(np.ones((c, c), bool), -1)
    decay = np.exp(np.where(lower, cum[:, None] - cum[None, :], -np.inf)).astype(np.float32)
    a = np.where(strict, beta[:, None] * (k @ k.T) * decay, 0).astype(np.float32)
    u = _neumann_inverse(a) @ (beta[:, None] * v)  # zero state: v_new = U
    o_neumann = torch.from_numpy(np.tril(q @ k.T * decay) @ u)
    with pytest.raises(AssertionError):
        assert_close(o_neumann, ref_o[0, :, 0], 1e-2, "Neumann doubling")
