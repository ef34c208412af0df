"""The same kernels under the official `nki.simulate` (Neuron SDK 2.29+), when it is installed.

PyPI carries only placeholders under the Neuron names, so these skip on dev/CI machines; the emulator tests
run the same kernel source every time. On a Neuron host they check that our emulator and the official
simulator agree, and both match the torch reference (tolerances as in test_deltanet_chunk).
"""

from __future__ import annotations

import pytest

from qwenpd.kernels.gated_delta_rule import naive_gated_delta_rule
from qwenpd.kernels.nki import nki_chunk_gated_delta_rule, nki_step_gated_delta_rule
from qwenpd.kernels.nki.backend import real_nki_available
from tests.kernels.nki.helpers import as_double, assert_close, make_inputs, random_state

pytestmark = pytest.mark.skipif(not real_nki_available(),
                                reason="the Neuron SDK (`import nki`, NKI >= 0.3.0) is not installed")
FP32 = 2e-5


@pytest.mark.parametrize("gates", ["realistic", "deep"])
def test_chunk_under_nki_simulate(gates):
    inputs = make_inputs(1, 129, 1, 2, 128, 128, seed=21, gates=gates)
    state0 = random_state(1, 2, 128, 128, seed=22)
    o, state = nki_chunk_gated_delta_rule(**inputs, initial_state=state0, mode="simulate")
    emu_o, emu_state = nki_chunk_gated_delta_rule(**inputs, initial_state=state0, mode="emulator")
    ref_o, ref_state = naive_gated_delta_rule(**as_double(inputs), initial_state=state0.double())
    assert_close(o, ref_o, FP32, "o vs reference")
    assert_close(state, ref_state, FP32, "state vs reference")
    assert_close(o, emu_o, FP32, "o vs emulator")
    assert_close(state, emu_state, FP32, "state vs emulator")


def test_step_under_nki_simulate():
    inputs = {n: x[:, 0] for n, x in make_inputs(2, 1, 1, 2, 128, 128, seed=23).items()}
    state, emu_state = random_state(2, 2, 128, 128, seed=24), random_state(2, 2, 128, 128, seed=24)
    o = nki_step_gated_delta_rule(**inputs, state=state, mode="simulate")
    emu_o = nki_step_gated_delta_rule(**inputs, state=emu_state, mode="emulator")
    assert_close(o, emu_o, FP32, "o vs emulator")
    assert_close(state, emu_state, FP32, "state vs emulator")
