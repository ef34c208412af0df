"""NKI decode step (emulator, every run) against the torch references step_gated_delta_rule and the naive loop.

Tolerance 2e-5 norm-wise (see test_deltanet_chunk): one step is a handful of fp32 dot products of length
K <= 128; measured errors are ~1e-7. bf16 outputs: 8e-3 (two independent roundings to 8 significant bits).
"""

from __future__ import annotations

import pytest
import torch

from qwenpd.kernels.gated_delta_rule import naive_gated_delta_rule, step_gated_delta_rule
from qwenpd.kernels.nki import nki_chunk_gated_delta_rule, nki_step_gated_delta_rule
from tests.kernels.nki.helpers import as_double, assert_close, make_inputs, random_state

FP32, BF16 = 2e-5, 8e-3
EMU = {"mode": "emulator"}


def _token(inputs, t):
    return {name: x[:, t] for name, x in inputs.items()}


@pytest.mark.parametrize("hk, hv", [(2, 2), (2, 4)], ids=["Hk2-Hv2", "Hk2-Hv4"])
@pytest.mark.parametrize("dk, dv", [(128, 128), (16, 32)], ids=["K128-V128", "K16-V32"])
def test_matches_step_reference(hk, hv, dk, dv):
    inputs = _token(make_inputs(3, 1, hk, hv, dk, dv, seed=hv + dk), 0)
    state = random_state(3, hv, dk, dv, seed=2)
    ref_state = state.clone()
    o = nki_step_gated_delta_rule(**inputs, state=state, **EMU)
    ref_o = step_gated_delta_rule(**inputs, state=ref_state)
    assert o.shape == (3, hv, dv) and o.dtype == torch.float32
    assert_close(o, ref_o, FP32, "o")
    assert_close(state, ref_state, FP32, "state (updated in place)")


@pytest.mark.parametrize("gates", ["realistic", "deep", "weak"])
def test_decode_after_prefill_matches_the_naive_loop(gates):
    """Prefill 129 tokens with the chunk kernel, then decode 4 tokens with the step kernel: the hand-off."""
    inputs = make_inputs(2, 133, 1, 2, 128, 128, seed=8, gates=gates)
    prompt = {name: x[:, :129] for name, x in inputs.items()}
    outs, (_, state) = [], nki_chunk_gated_delta_rule(**prompt, **EMU)
    for t in range(129, 133):
        outs.append(nki_step_gated_delta_rule(**_token(inputs, t), state=state, **EMU))
    ref_o, ref_state = naive_gated_delta_rule(**as_double(inputs))
    assert_close(torch.stack(outs, 1), ref_o[:, 129:], FP32, "decoded o")
    assert_close(state, ref_state, FP32, "state")


def test_bf16_inputs_and_no_l2norm():
    inputs = _token(make_inputs(2, 1, 1, 2, 128, 128, seed=9, dtype=torch.bfloat16), 0)
    state = random_state(2, 2, 128, 128, seed=3)
    ref_state = state.clone()
    o = nki_step_gated_delta_rule(**inputs, state=state, use_qk_l2norm=False, **EMU)
    ref_o = step_gated_delta_rule(**inputs, state=ref_state, use_qk_l2norm=False)
    assert o.dtype == torch.bfloat16
    assert_close(o, ref_o, BF16, "o (bf16)")
    assert_close(state, ref_state, FP32, "state")


def test_rejects_a_non_fp32_state():
    inputs = _token(make_inputs(1, 1, 1, 1, 16, 16, seed=0), 0)
    with pytest.raises(ValueError, match="state must be float32"):
        nki_step_gated_delta_rule(**inputs, state=torch.zeros(1, 1, 16, 16, dtype=torch.bfloat16), **EMU)
