"""The CPU kernel of a decode step's state update (kernels/gated_delta_rule/cpu_step.cpp) against its plain
reference, step_state_torch: the same math in another order (fp32, tight bounds), the same bits for a row alone or
in any batch, in place on the state, traced by torch.compile as the engine's compiled decode step traces it; its
several-tokens op (step_states) against step_state token after token, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qwenpd.kernels.gated_delta_rule import (cpu, step_inputs, step_state, step_state_torch, step_states,
                                             step_states_torch)
from tests.kernels.helpers import assert_close, gdn_inputs

needs_kernel = pytest.mark.skipif(not cpu.load(), reason=f"no delta-rule step kernel here: {cpu.why_not}")
NAMES = ("q", "k", "v", "g", "beta")
# fp32 sums of K products in another order (and fmas): observed max error ~1e-7 on O(1) values
TOL = dict(atol=2e-6, rtol=1e-5)


def _prepared(batch: int, hk: int, hv: int, dk: int, dv: int, dtype: torch.dtype, seed: int):
    inputs = gdn_inputs(batch, 1, hk, hv, dk, dv, dtype, seed=seed, with_state=True)
    state = inputs["initial_state"] * 3  # a state of the size a long prompt leaves, not only unit noise
    return step_inputs(*(inputs[n][:, 0] for n in NAMES)), state.contiguous()


@needs_kernel
@pytest.mark.parametrize("batch,hk,hv,dk,dv", [(1, 1, 1, 16, 16), (3, 2, 4, 16, 40), (8, 4, 8, 128, 128),
                                               (2, 2, 2, 64, 24), (5, 1, 3, 32, 129)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernel_is_the_torch_code(batch, hk, hv, dk, dv, dtype):
    x, state = _prepared(batch, hk, hv, dk, dv, dtype, seed=batch * 7 + dv)
    ref_state, ours = state.clone(), state.clone()
    want = step_state_torch(x, ref_state)
    got = torch.ops.qwenpd_delta.step_state(x.qk, x.qdotk, x.decay, x.beta, x.v, ours)
    assert_close(got, want.float(), **(TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)), what="o")
    assert_close(ours, ref_state, **TOL, what="state updated in place")
    assert step_state(x, state.clone()).dtype == dtype  # step_state takes it, in the inputs' dtype


@needs_kernel
def test_many_steps_stay_with_the_torch_code():
    """The state carries every step's rounding into the next: 200 steps apart stay within fp32 noise."""
    inputs = gdn_inputs(2, 200, 2, 4, 64, 64, torch.float32, seed=3, with_state=True)
    ref, ours = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    for t in range(200):
        x = step_inputs(*(inputs[n][:, t] for n in NAMES))
        want = step_state_torch(x, ref)
        got = torch.ops.qwenpd_delta.step_state(x.qk, x.qdotk, x.decay, x.beta, x.v, ours)
    assert_close(got, want, **TOL, what="last output")
    assert_close(ours, ref, **TOL, what="state after 200 steps")


@needs_kernel
def test_a_row_is_the_same_bits_alone_in_any_batch_and_thread_count():
    x, state = _prepared(6, 2, 4, 32, 48, torch.bfloat16, seed=11)
    together = state.clone()
    out = step_state(x, together)
    threads = torch.get_num_threads()
    try:
        for b, n in zip(range(6), (1, 2, 1, 2, 1, 2)):
            torch.set_num_threads(n)
            alone = state[b:b + 1].clone()
            assert torch.equal(step_state(x.rows(slice(b, b + 1)), alone), out[b:b + 1]), b
            assert torch.equal(alone, together[b:b + 1]), b
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_compiled_as_the_decode_step_compiles_it():
    """fullgraph, static shapes, state a graph input mutated in place: the eager kernel's bits."""
    x, state = _prepared(4, 2, 4, 32, 32, torch.bfloat16, seed=5)

    def fn(qk, k, qdotk, decay, beta, v, s):
        return step_state(type(x)(qk, k, qdotk, decay, beta, v, torch.bfloat16), s)

    eager_state, compiled_state = state.clone(), state.clone()
    want = fn(*x[:-1], eager_state)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    got = compiled(*x[:-1], compiled_state)
    assert torch.equal(got, want)
    assert torch.equal(compiled_state, eager_state)
    # as a decode step passes it: the first rows of a batch's slot tensor, under inference mode; the rows past
    # them (free slots) untouched
    slots = torch.cat([state, torch.full_like(state[:2], 7.0)])
    with torch.inference_mode():
        got = compiled(*x[:-1], slots[:4])
    assert torch.equal(got, want)
    assert torch.equal(slots[:4], eager_state) and bool((slots[4:] == 7.0).all())


@needs_kernel
def test_the_kernel_refuses_what_it_does_not_compute():
    x, state = _prepared(2, 1, 2, 16, 16, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="state must be contiguous fp32"):
        torch.ops.qwenpd_delta.step_state(x.qk, x.qdotk, x.decay, x.beta, x.v, state.double())
    with pytest.raises(RuntimeError, match="qk must be"):
        torch.ops.qwenpd_delta.step_state(x.qk[:, :, :1], x.qdotk, x.decay, x.beta, x.v, state)
    # a strided state (not a whole slot range) is left to the torch code by step_state
    wide = torch.zeros(2, 2, 16, 32)
    view = wide[..., :16]
    view.copy_(state)
    ref = state.clone()
    assert torch.equal(step_state(x, view), step_state_torch(x, ref))
    assert torch.equal(view, ref)


def test_switched_off_steps_take_the_torch_code():
    code = ("import torch; from qwenpd.kernels.gated_delta_rule import cpu, step_inputs, step_state, "
            "step_state_torch; from tests.kernels.helpers import gdn_inputs; "
            "i = gdn_inputs(2, 1, 1, 2, 16, 16, torch.float32, seed=2, with_state=True); "
            "x = step_inputs(*(i[n][:, 0] for n in ('q', 'k', 'v', 'g', 'beta'))); s = i['initial_state']; "
            "print(cpu.load(), cpu.why_not, torch.equal(step_state(x, s.clone()), step_state_torch(x, s.clone())))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, cpu.DISABLE_ENV: "0"}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["False", f"{cpu.DISABLE_ENV}=0", "True"]


def _tokens(rows: int, hk: int, hv: int, dk: int, dv: int, seed: int):
    inputs = gdn_inputs(rows, 1, hk, hv, dk, dv, torch.bfloat16, seed=seed, with_state=True)
    return step_inputs(*(inputs[n][:, 0] for n in NAMES)), (inputs["initial_state"] * 3).contiguous()


@needs_kernel
@pytest.mark.parametrize("counts", [[4], [1], [3, 1, 4], [2, 0, 3]], ids=str)
def test_many_tokens_per_sequence_are_step_state_token_after_token(counts):
    """step_states (speculative decoding's verify pass): every row's output, every snapshot and every final state
    the bits of step_state run one token at a time, in slots out of order, padding rows left zero."""
    offsets = [sum(counts[:b]) for b in range(len(counts))]
    rows = sum(counts) + 2  # two padding rows no sequence reads
    x, state = _tokens(rows, 2, 4, 32, 24, seed=sum(counts))
    slots = list(range(len(counts)))[::-1]  # sequence b in slot B-1-b
    pool = torch.cat([state[:len(counts)], torch.full_like(state[:1], 5.0)])  # and a slot nobody steps
    ours, snaps = pool.clone(), torch.full((rows, *state.shape[1:]), -1.0)
    got = step_states(x, ours, slots, offsets, counts, snaps)
    ref, want = pool.clone(), torch.zeros(rows, *x.v.shape[1:], dtype=torch.bfloat16)
    for slot, lo, n in zip(slots, offsets, counts):
        for r in range(lo, lo + n):
            want[r] = step_state(x.rows(slice(r, r + 1)), ref[slot:slot + 1])[0]
            if r + 1 < lo + n:
                assert torch.equal(snaps[r], ref[slot]), r
            else:
                assert bool((snaps[r] == -1.0).all()), r  # a sequence's last state is its slot's, not copied
    assert torch.equal(got, want)
    assert torch.equal(ours, ref)
    assert bool((got[-2:] == 0).all()) and bool((ours[-1] == 5.0).all())
    torch_state = pool.clone()
    assert_close(step_states_torch(x, torch_state, slots, offsets, counts).float(), want.float(), atol=1e-2,
                 rtol=1e-2, what="the plain reference")
    assert_close(torch_state, ref, **TOL, what="its states")


@needs_kernel
def test_many_tokens_refuses_rows_it_does_not_have():
    x, state = _tokens(3, 1, 2, 16, 16, seed=4)
    with pytest.raises(RuntimeError, match="rows of sequence 0 out of 3"):
        step_states(x, state, [0], [1], [3])
    with pytest.raises(RuntimeError, match="slot 3 out of 3"):
        step_states(x, state, [3], [0], [1])
    with pytest.raises(RuntimeError, match="snaps must be"):
        step_states(x, state, [0], [0], [2], torch.zeros(2, 2, 16, 16))
    two = torch.cat([state, state])
    with pytest.raises(RuntimeError, match="slot 0 given twice"):
        step_states(x, two, [0, 0], [0, 1], [1, 1])
    with pytest.raises(RuntimeError, match="rows of sequences 0 and 1 overlap"):
        step_states(x, two, [0, 1], [0, 1], [2, 1])
