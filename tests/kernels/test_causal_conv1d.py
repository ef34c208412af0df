"""Causal depthwise conv: chunk (prefill) and update (decode) against the naive reference and transformers."""

from __future__ import annotations

import itertools

import pytest
import torch

from qwenpd.kernels import causal_conv1d, causal_conv1d_update, naive_causal_conv1d
from qwenpd.kernels.causal_conv1d import conv as conv_module
from tests.kernels.helpers import DTYPE_NAMES, assert_close

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

# All paths sum in fp32 and round once to the weight dtype; only the summation order differs.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       # bf16 output: a 1e-7 fp32 difference can flip one rounding, one ulp = 2^-8 relative.
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
DIM = 24


def _inputs(batch, seq, width, dtype, with_state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, DIM, generator=gen).to(dtype)
    weight = (torch.randn(DIM, width, generator=gen) / width ** 0.5).to(dtype)
    state = torch.randn(batch, DIM, width - 1, generator=gen).to(dtype) if with_state else None
    return x, weight, state


def _hf_prefill(x, weight, state, activation):
    """HF's causal_conv1d_fn over [state, x] channel-major, the state part cut off again."""
    width = weight.shape[1]
    if state is None:
        state = x.new_zeros(x.shape[0], DIM, width - 1)
    padded = torch.cat([state, x.transpose(1, 2)], dim=-1)
    return hf.causal_conv1d_fn(padded, weight, activation=activation)[..., width - 1:].transpose(1, 2)


def _grid():
    for seq, width, dtype, with_state, activation in itertools.product(
            (1, 2, 3, 4, 17, 64), (2, 4), (torch.float32, torch.bfloat16, torch.float64), (False, True),
            ("silu", None)):
        name = f"T{seq}-W{width}-D{DIM}-{DTYPE_NAMES[dtype]}{'-state' if with_state else ''}-{activation or 'linear'}"
        yield pytest.param(seq, width, dtype, with_state, activation, id=name)


@pytest.mark.parametrize("seq, width, dtype, with_state, activation", list(_grid()))
def test_conv_matches_naive_and_transformers(seq, width, dtype, with_state, activation):
    x, weight, state = _inputs(3, seq, width, dtype, with_state, seed=seq * 10 + width)
    y_ref, s_ref = naive_causal_conv1d(x, weight, state, activation)
    y, s = causal_conv1d(x, weight, state, activation)
    assert y.shape == x.shape and y.dtype == dtype and s.shape == (3, DIM, width - 1)
    assert_close(y, y_ref, **TOL[dtype], what="conv vs naive")
    assert_close(y, _hf_prefill(x, weight, state, activation), **TOL[dtype], what="conv vs hf")
    assert torch.equal(s, s_ref)
    history = torch.cat([state if with_state else x.new_zeros(3, DIM, width - 1), x.transpose(1, 2)], dim=-1)
    assert torch.equal(s, history[..., -(width - 1):])  # the last W-1 inputs, also when T < W-1


@pytest.mark.parametrize("block_tokens", [1, 2, 5], ids=lambda n: f"block{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
def test_conv_blocks_carry_the_window(monkeypatch, block_tokens, dtype):
    """Blocks shorter than the kernel window must still see W-1 earlier inputs (CPU blocking of long chunks)."""
    x, weight, state = _inputs(2, 23, 4, dtype, with_state=True, seed=1)
    y_one_block, s_one_block = causal_conv1d(x, weight, state)
    monkeypatch.setattr(conv_module, "BLOCK_ELEMENTS", 2 * DIM * block_tokens)
    y, s = causal_conv1d(x, weight, state)
    assert_close(y, y_one_block, **TOL[dtype])
    assert torch.equal(s, s_one_block)


@pytest.mark.parametrize("split", [1, 2, 3, 4, 17], ids=lambda s: f"split{s}-W4")  # 1, 2, W-1, W, beyond
def test_conv_state_carried_across_splits(split):
    x, weight, state = _inputs(2, 30, 4, torch.float32, with_state=True, seed=2)
    y_whole, s_whole = causal_conv1d(x, weight, state)
    y1, s1 = causal_conv1d(x[:, :split], weight, state)
    y2, s2 = causal_conv1d(x[:, split:], weight, s1)
    assert_close(torch.cat([y1, y2], 1), y_whole, **TOL[torch.float32])
    assert torch.equal(s2, s_whole)


def test_conv_many_short_pieces_equal_whole():
    x, weight, _ = _inputs(2, 30, 4, torch.float32, with_state=False, seed=3)
    y_whole, s_whole = naive_causal_conv1d(x, weight)
    state, pieces, start = None, [], 0
    for length in (1, 2, 1, 3, 4, 5, 14):
        y, state = causal_conv1d(x[:, start:start + length], weight, state)
        pieces.append(y)
        start += length
    assert_close(torch.cat(pieces, 1), y_whole, **TOL[torch.float32])
    assert torch.equal(state, s_whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("activation", ["silu", None], ids=["silu", "linear"])
def test_update_token_by_token_equals_prefill_and_transformers(dtype, activation):
    x, weight, state = _inputs(4, 12, 4, dtype, with_state=True, seed=4)
    y_prefill, s_prefill = causal_conv1d(x, weight, state, activation)
    ours, theirs = state.clone(), state.clone()
    for t in range(x.shape[1]):
        y = causal_conv1d_update(x[:, t], weight, ours, activation)
        y_hf = hf.causal_conv1d_update(x[:, t, :, None], theirs, weight, activation=activation)[..., 0]
        assert y.shape == (4, DIM) and y.dtype == dtype
        assert_close(y, y_prefill[:, t], **TOL[dtype], what=f"token {t} vs prefill")
        assert_close(y, y_hf, **TOL[dtype], what=f"token {t} vs hf")
    assert torch.equal(ours, s_prefill)  # updated in place
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("width", [4, 5])
def test_update_many_is_update_token_by_token_bit_for_bit(state_dtype, width):
    """causal_conv1d_update_many (speculative verify): several sequences' tokens at once, padding rows after them,
    each output and each intermediate state the bits of causal_conv1d_update token after token."""
    weight = torch.randn(DIM * 8, width, generator=torch.Generator().manual_seed(3))
    lengths = [4, 1, 3]
    x = torch.randn(sum(lengths) + 2, DIM * 8, generator=torch.Generator().manual_seed(4))  # + 2 padding rows
    states = [torch.randn(DIM * 8, width - 1, generator=torch.Generator().manual_seed(5 + b)).to(state_dtype)
              for b in range(len(lengths))]
    y, histories = conv_module.causal_conv1d_update_many(x, weight, states, lengths)
    lo = 0
    for b, n in enumerate(lengths):
        state = states[b][None].clone()
        for t in range(n):
            assert torch.equal(histories[b][:, t:t + width - 1], state[0]), (b, t)
            want = causal_conv1d_update(x[lo + t:lo + t + 1], weight, state)
            assert torch.equal(y[lo + t], want[0]), (b, t)
        assert torch.equal(histories[b][:, n:n + width - 1], state[0]) and histories[b].dtype == state_dtype
        lo += n
    assert y.shape == x.shape


def test_prefill_then_update_equals_whole():
    x, weight, state = _inputs(2, 20, 4, torch.float32, with_state=True, seed=5)
    y_whole, s_whole = causal_conv1d(x, weight, state)
    y, s = causal_conv1d(x[:, :15], weight, state)
    steps = [causal_conv1d_update(x[:, t], weight, s) for t in range(15, 20)]
    assert_close(torch.cat([y, torch.stack(steps, 1)], 1), y_whole, **TOL[torch.float32])
    assert torch.equal(s, s_whole)


@pytest.mark.parametrize("kernel", [naive_causal_conv1d, causal_conv1d], ids=["naive", "conv"])
@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(2, 5, DIM + 1)), "channels"),
    (dict(x=torch.randn(5, DIM)), "x must be"),
    (dict(weight=torch.randn(DIM, 4, 1)), "weight must be"),
    (dict(state=torch.randn(2, DIM, 4)), "state must be"),
    (dict(state=torch.randn(3, DIM, 3)), "state must be"),
    (dict(activation="gelu"), "activation"),
    (dict(x=torch.ones(2, 5, DIM, dtype=torch.int32)), "floating-point"),
], ids=["channels", "x-rank", "weight-rank", "state-width", "state-batch", "activation", "int-x"])
def test_conv_rejects_bad_inputs(kernel, bad, message):
    args = dict(x=torch.randn(2, 5, DIM), weight=torch.randn(DIM, 4), state=torch.randn(2, DIM, 3))
    with pytest.raises(ValueError, match=message):
        kernel(**{**args, **bad})


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(2, 1, DIM)), "x must be"),
    (dict(state=torch.randn(2, DIM, 2)), "state must be"),
    (dict(weight=torch.randn(DIM - 1, 4)), "channels"),
], ids=["x-rank", "state-width", "weight-channels"])
def test_update_rejects_bad_inputs(bad, message):
    args = dict(x=torch.randn(2, DIM), weight=torch.randn(DIM, 4), state=torch.randn(2, DIM, 3))
    with pytest.raises(ValueError, match=message):
        causal_conv1d_update(**{**args, **bad})
