"""Gated delta rule: chunk (prefill) and step (decode) against the naive reference and transformers' torch code."""

from __future__ import annotations

import itertools

import pytest
import torch

from qwenpd.kernels import chunk_gated_delta_rule, naive_gated_delta_rule, step_gated_delta_rule
from tests.kernels.helpers import DTYPE_NAMES, assert_close, gdn_inputs

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

# fp32: chunk and naive do the same fp32 math in different orders; observed max error ~1e-6 on O(1) values.
FP32_TOL = dict(atol=2e-5, rtol=1e-4)
# bf16 inputs: both sides read the same bf16 values and run in fp32 with an fp32 state, but the output is rounded
# to bf16 (8-bit mantissa, one ulp = 2^-8 relative), so a 1e-6 fp32 difference can flip one output rounding.
BF16_OUT_TOL = dict(atol=1e-2, rtol=1e-2)

K, V = 16, 32  # K != V catches transposed state dims


def _grid():
    for seq, chunk, ratio, dtype, with_state, with_mask in itertools.product(
            (1, 7, 63, 64, 65, 300), (16, 64), (1, 2), (torch.float32, torch.bfloat16), (False, True), (False, True)):
        hk, hv = 2, 2 * ratio
        name = (f"T{seq}-C{chunk}-Hk{hk}-Hv{hv}-K{K}-V{V}-{DTYPE_NAMES[dtype]}"
                f"{'-state' if with_state else ''}{'-mask' if with_mask else ''}")
        yield pytest.param(seq, chunk, hk, hv, dtype, with_state, with_mask, id=name)


def _out_tol(dtype):
    return BF16_OUT_TOL if dtype == torch.bfloat16 else FP32_TOL


def _hf_kwargs(inputs):
    return dict(initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("seq, chunk, hk, hv, dtype, with_state, with_mask", list(_grid()))
def test_chunk_matches_naive(seq, chunk, hk, hv, dtype, with_state, with_mask):
    inputs = gdn_inputs(3, seq, hk, hv, K, V, dtype, seed=seq * 131 + chunk, with_state=with_state,
                        with_mask=with_mask)
    o_ref, s_ref = naive_gated_delta_rule(**inputs)
    o, s = chunk_gated_delta_rule(**inputs, chunk_size=chunk)
    assert o.dtype == dtype and o.shape == (3, seq, hv, V)
    assert s.dtype == torch.float32 and s.shape == (3, hv, K, V)
    assert_close(o, o_ref, **_out_tol(dtype), what="output")
    assert_close(s, s_ref, **FP32_TOL, what="state")
    if with_mask:
        assert (o[~inputs["mask"]] == 0).all() and (o_ref[~inputs["mask"]] == 0).all()


@pytest.mark.parametrize("seq, chunk, hk, hv, dtype, with_state, with_mask",
                         [p for p in _grid() if "mask" not in p.id and p.values[0] in (1, 64, 65, 300)])
def test_chunk_matches_transformers(seq, chunk, hk, hv, dtype, with_state, with_mask):
    """Second oracle: transformers' chunked and token-by-token torch implementations (no padding mask there)."""
    inputs = gdn_inputs(2, seq, hk, hv, K, V, dtype, seed=seq + chunk, with_state=with_state)
    o, s = chunk_gated_delta_rule(**inputs, chunk_size=chunk)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    for name, (o_hf, s_hf) in (
            ("hf chunk", hf.torch_chunk_gated_delta_rule(*args, chunk_size=chunk, **_hf_kwargs(inputs))),
            ("hf recurrent", hf.torch_recurrent_gated_delta_rule(*args, **_hf_kwargs(inputs)))):
        assert_close(o, o_hf, **_out_tol(dtype), what=f"{name} output")
        assert_close(s, s_hf, **FP32_TOL, what=f"{name} state")


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_chunk_fp64_matches_naive_exactly(chunk, with_mask):
    """In fp64 the chunked form is the same function as the recurrence: only rounding at 1e-16 separates them."""
    inputs = gdn_inputs(3, 300, 2, 4, K, V, torch.float64, seed=5, with_state=True, with_mask=with_mask)
    o_ref, s_ref = naive_gated_delta_rule(**inputs)
    o, s = chunk_gated_delta_rule(**inputs, chunk_size=chunk)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert_close(o, o_ref, atol=1e-10, what="output")
    assert_close(s, s_ref, atol=1e-10, what="state")


@pytest.mark.parametrize("g_range", [
    pytest.param((-10.0, -1.0), id="strong-g-10..-1"),  # ~-350 per 64-token chunk: exp underflows, must not NaN
    pytest.param((-5.0, -1.0), id="strong-g-5..-1"),
    pytest.param((-2e-3, -5e-4), id="weak-g-1e-3"),  # state keeps ~all 4096 tokens: longest error accumulation
])
def test_chunk_long_sequence_extreme_decay(g_range):
    inputs = gdn_inputs(1, 4096, 1, 2, K, V, seed=11, g_range=g_range, with_state=True)
    o_ref, s_ref = naive_gated_delta_rule(**inputs)
    o, s = chunk_gated_delta_rule(**inputs)
    # Same fp32 bound as the short grid: with unit keys and beta in (0, 1) each step contracts the state, so
    # rounding differences do not compound over 4096 steps (observed max ~2e-6, also with weak decay).
    assert_close(o, o_ref, **FP32_TOL, what="output")
    assert_close(s, s_ref, **FP32_TOL, what="state")


def test_chunk_bounded_when_decay_underflows_fp64():
    """Decays far beyond fp32 range (cumulative -3000 per chunk) stay finite in fp64 too, and match naive."""
    inputs = gdn_inputs(1, 256, 1, 1, K, V, torch.float64, seed=2, g_range=(-60.0, -40.0), with_state=True)
    o_ref, s_ref = naive_gated_delta_rule(**inputs)
    o, s = chunk_gated_delta_rule(**inputs)
    assert_close(o, o_ref, atol=1e-10, what="output")
    assert_close(s, s_ref, atol=1e-10, what="state")


@pytest.mark.parametrize("kernel", ["naive", "chunk"])
def test_masked_tokens_leave_state_unchanged(kernel):
    """Left-padded row 0 / right-padded row 1 == running only their real tokens; padded outputs are zero."""
    run = naive_gated_delta_rule if kernel == "naive" else lambda *a, **kw: chunk_gated_delta_rule(*a, chunk_size=16, **kw)
    inputs = gdn_inputs(2, 70, 2, 4, K, V, seed=3, with_state=True)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[0, :23] = False
    mask[1, 50:] = False
    o, s = run(**{**inputs, "mask": mask})
    for row, real in ((0, slice(23, 70)), (1, slice(0, 50))):
        alone = {n: inputs[n][row:row + 1, real] for n in ("q", "k", "v", "g", "beta")}
        o_alone, s_alone = run(**alone, initial_state=inputs["initial_state"][row:row + 1])
        assert_close(o[row:row + 1, real], o_alone, **FP32_TOL, what=f"row {row} output")
        assert_close(s[row:row + 1], s_alone, **FP32_TOL, what=f"row {row} state")
        assert (o[row][~mask[row]] == 0).all()
    all_masked = run(**{**inputs, "mask": torch.zeros(2, 70, dtype=torch.bool)})
    assert_close(all_masked[1], inputs["initial_state"], atol=0, what="fully masked state")


@pytest.mark.parametrize("split", [1, 16, 63, 64, 100], ids=lambda s: f"split{s}-C64")
def test_chunk_prefix_then_rest_equals_whole(split):
    inputs = gdn_inputs(2, 160, 2, 4, K, V, seed=4, with_state=True)
    o_whole, s_whole = chunk_gated_delta_rule(**inputs, chunk_size=64)
    names = ("q", "k", "v", "g", "beta")
    o1, s1 = chunk_gated_delta_rule(*(inputs[n][:, :split] for n in names), initial_state=inputs["initial_state"])
    o2, s2 = chunk_gated_delta_rule(*(inputs[n][:, split:] for n in names), initial_state=s1)
    assert_close(torch.cat([o1, o2], 1), o_whole, **FP32_TOL, what="output")
    assert_close(s2, s_whole, **FP32_TOL, what="state")


def test_chunk_accepts_strided_views_and_keeps_initial_state():
    """The engine passes q/k/v as views of one projection; the caller's initial state is never written."""
    batch, seq, hk, hv = 2, 45, 2, 4
    gen = torch.Generator().manual_seed(9)
    mixed = torch.randn(batch, seq, 2 * hk * K + hv * V, generator=gen)
    q, k, v = mixed.split((hk * K, hk * K, hv * V), dim=-1)
    q, k, v = q.unflatten(-1, (hk, K)), k.unflatten(-1, (hk, K)), v.unflatten(-1, (hv, V))
    rest = gdn_inputs(batch, seq, hk, hv, K, V, seed=9, with_state=True)
    state = rest["initial_state"].clone()
    o, s = chunk_gated_delta_rule(q, k, v, rest["g"], rest["beta"], initial_state=state, chunk_size=16)
    o_ref, s_ref = naive_gated_delta_rule(q.contiguous(), k.contiguous(), v.contiguous(), rest["g"], rest["beta"],
                                          initial_state=state)
    assert_close(o, o_ref, **FP32_TOL, what="output")
    assert_close(s, s_ref, **FP32_TOL, what="state")
    assert torch.equal(state, rest["initial_state"])
    assert o.is_contiguous()


@pytest.mark.parametrize("kernel", ["chunk", "step"])
def test_without_qk_l2norm(kernel):
    inputs = gdn_inputs(2, 20, 2, 4, K, V, seed=6, with_state=True)
    inputs["k"] = inputs["k"] * 0.2  # |k|^2 ~ 0.6 keeps the un-normalised delta rule stable
    o_ref, s_ref = naive_gated_delta_rule(**inputs, use_qk_l2norm=False)
    if kernel == "chunk":
        o, s = chunk_gated_delta_rule(**inputs, chunk_size=16, use_qk_l2norm=False)
    else:
        s = inputs["initial_state"].clone()
        o = torch.stack([step_gated_delta_rule(*(inputs[n][:, t] for n in ("q", "k", "v", "g", "beta")), s,
                                               use_qk_l2norm=False) for t in range(20)], dim=1)
    assert_close(o, o_ref, **FP32_TOL, what="output")
    assert_close(s, s_ref, **FP32_TOL, what="state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("ratio", [1, 2], ids=lambda r: f"Hv/Hk{r}")
def test_step_token_by_token_equals_naive(dtype, ratio):
    batch, seq, hk = 5, 40, 2
    inputs = gdn_inputs(batch, seq, hk, hk * ratio, K, V, dtype, seed=7 + ratio, with_state=True)
    o_ref, s_ref = naive_gated_delta_rule(**inputs)
    state = inputs["initial_state"].clone()
    outs = []
    for t in range(seq):
        o_t = step_gated_delta_rule(*(inputs[n][:, t] for n in ("q", "k", "v", "g", "beta")), state)
        assert o_t.dtype == dtype and o_t.shape == (batch, hk * ratio, V)
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o_ref, **_out_tol(dtype), what="output")
    assert_close(state, s_ref, **FP32_TOL, what="state updated in place")


@pytest.mark.parametrize("ratio", [1, 2], ids=lambda r: f"Hv/Hk{r}")
def test_step_inputs_then_states_are_the_step_bit_for_bit(ratio):
    """step_inputs over many tokens at once, then step_state one row at a time (speculative verify): the bits of
    step_gated_delta_rule token by token, outputs and state."""
    from qwenpd.kernels.gated_delta_rule import step_inputs, step_state

    seq, hk = 6, 2
    inputs = gdn_inputs(1, seq, hk, hk * ratio, K, V, torch.bfloat16, seed=17, with_state=True)
    names = ("q", "k", "v", "g", "beta")
    state = inputs["initial_state"].clone()
    want = [step_gated_delta_rule(*(inputs[n][:, t] for n in names), state) for t in range(seq)]
    prepared = step_inputs(*(inputs[n][0] for n in names))  # the tokens as rows
    ours = inputs["initial_state"].clone()
    for t in range(seq):
        assert torch.equal(step_state(prepared.rows(slice(t, t + 1)), ours), want[t]), t
    assert torch.equal(ours, state)


def test_chunk_prefill_then_step_decode_equals_whole():
    """The engine's hand-off: chunked prefill of a prompt, then decode steps from the returned state."""
    inputs = gdn_inputs(3, 90, 2, 4, K, V, seed=8, with_state=True)
    o_whole, s_whole = naive_gated_delta_rule(**inputs)
    names = ("q", "k", "v", "g", "beta")
    o, state = chunk_gated_delta_rule(*(inputs[n][:, :80] for n in names), initial_state=inputs["initial_state"])
    outs = [step_gated_delta_rule(*(inputs[n][:, t] for n in names), state) for t in range(80, 90)]
    assert_close(torch.cat([o, torch.stack(outs, 1)], 1), o_whole, **FP32_TOL, what="output")
    assert_close(state, s_whole, **FP32_TOL, what="state")


def _seq_args(**over):
    inputs = gdn_inputs(2, 8, 2, 4, K, V, seed=0, with_state=True, with_mask=True)
    return {**inputs, **over}


@pytest.mark.parametrize("kernel", [naive_gated_delta_rule, chunk_gated_delta_rule], ids=["naive", "chunk"])
@pytest.mark.parametrize("bad, message", [
    (dict(v=torch.randn(2, 8, 3, V)), "multiple of key heads"),
    (dict(k=torch.randn(2, 8, 2, K + 1)), "k must match q"),
    (dict(v=torch.randn(2, 9, 4, V)), "v must be"),
    (dict(g=torch.randn(2, 8, 2)), "g must be"),
    (dict(beta=torch.rand(1, 8, 4)), "beta must be"),
    (dict(initial_state=torch.zeros(2, 4, V, K)), "initial_state must be"),
    (dict(mask=torch.ones(2, 8)), "mask must be bool"),
    (dict(mask=torch.ones(2, 7, dtype=torch.bool)), "mask must be"),
    (dict(q=torch.randn(2, 8, 2 * K)), "q must be"),
    (dict(q=torch.ones(2, 8, 2, K, dtype=torch.int64)), "floating-point"),
], ids=["head-ratio", "k-shape", "v-length", "g-heads", "beta-batch", "state-shape", "mask-dtype", "mask-shape",
        "q-rank", "int-q"])
def test_sequence_kernels_reject_bad_inputs(kernel, bad, message):
    with pytest.raises(ValueError, match=message):
        kernel(**_seq_args(**bad))


def test_chunk_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(**_seq_args(), chunk_size=0)


@pytest.mark.parametrize("bad, message", [
    (dict(state=torch.zeros(2, 4, K, V, dtype=torch.bfloat16)), "state must be float32"),
    (dict(state=torch.zeros(2, 4, V, K)), "state must be"),
    (dict(v=torch.randn(2, 3, V)), "multiple of key heads"),
    (dict(g=torch.randn(3, 4)), "g must be"),
    (dict(q=torch.randn(2, 1, 2, K)), "q must be"),
], ids=["state-bf16", "state-shape", "head-ratio", "g-batch", "q-rank"])
def test_step_rejects_bad_inputs(bad, message):
    args = dict(q=torch.randn(2, 2, K), k=torch.randn(2, 2, K), v=torch.randn(2, 4, V), g=-torch.rand(2, 4),
                beta=torch.rand(2, 4), state=torch.zeros(2, 4, K, V))
    with pytest.raises(ValueError, match=message):
        step_gated_delta_rule(**{**args, **bad})
