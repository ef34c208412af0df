"""The AMX projection kernel (kernels/amx_linear/amx.cpp) against its plain reference: the sum in float64 rounded
once; every row's bits independent of the rows beside it, the thread count and the weight rows' tiling; the
packed layout by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenpd.kernels.amx_linear import amx_linear, available, cpu, naive_linear, pack_weight

needs_kernel = pytest.mark.skipif(not available(), reason=f"no AMX projection kernel here: {cpu.why_not}")


def _inputs(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).bfloat16(), (torch.randn(n, k, generator=gen) / k ** 0.5).bfloat16()


def _check(x, w):
    got = amx_linear(x, pack_weight(w), w.shape[0])
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], w.shape[0])
    exact = x.double() @ w.double().T
    # fp32 sums (K terms of |x w| at 2^-24) then one rounding to bf16 (2^-8 relative)
    tol = 2.0 ** -8 * exact.abs() + x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - exact).abs() <= tol).all()
    return got


def test_the_packed_layout_by_hand():
    """Block (nb, kb) row i holds the pairs (w[16 nb + c, 32 kb + 2 i], w[16 nb + c, 32 kb + 2 i + 1]) of its 16
    output columns c; zero past N and K."""
    w = torch.arange(20 * 40, dtype=torch.float32).reshape(20, 40).bfloat16()
    p = pack_weight(w)
    assert p.shape == (2, 2, 16, 32)
    for nb, kb, i, c, j in ((0, 0, 0, 0, 0), (0, 0, 3, 5, 1), (1, 0, 15, 3, 1), (1, 1, 3, 3, 1), (0, 1, 2, 15, 0)):
        n, k = 16 * nb + c, 32 * kb + 2 * i + j
        assert p[nb, kb, i, 2 * c + j] == w[n, k], (nb, kb, i, c, j)
    assert (p[1, :, :, 8:] == 0).all() and (p[:, 1, 4:] == 0).all()  # rows 20.. and columns 40.. are padding


@needs_kernel
@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 100, 1024, 3072])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 33, 100])
def test_amx_linear_is_the_sum(n, k):
    for m in (1, 2, 15, 16, 17, 33, 70):
        _check(*_inputs(m, n, k, seed=m))


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 80), n=st.integers(1, 70), k=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_amx_linear_any_shape(m, n, k, seed):
    _check(*_inputs(m, n, k, seed))


@needs_kernel
def test_a_row_is_the_same_bits_alone_in_any_batch_and_thread_count():
    x, w = _inputs(300, 203, 1024, seed=5)
    p = pack_weight(w)
    every = amx_linear(x, p, 203)
    for rows in (1, 2, 3, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 128, 257, 300):
        for start in (0, 300 - rows, 3 if rows < 297 else 0):
            assert torch.equal(amx_linear(x[start:start + rows], p, 203), every[start:start + rows]), (rows, start)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(amx_linear(x, p, 203), every), f"{t} threads"
    finally:
        torch.set_num_threads(threads)
    # a weight-row slice (a TP shard) gives the same columns' bits: tiling over weight rows does not matter
    assert torch.equal(amx_linear(x, pack_weight(w[7:200]), 193), every[:, 7:200])


@needs_kernel
def test_amx_linear_takes_any_leading_shape_strided_input_and_no_rows():
    x, w = _inputs(6, 20, 64, seed=6)
    p = pack_weight(w)
    wide = torch.zeros(6, 128, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(amx_linear(wide[:, ::2], p, 20), amx_linear(x, p, 20))
    assert torch.equal(amx_linear(x.reshape(2, 3, 64), p, 20), amx_linear(x, p, 20).reshape(2, 3, 20))
    assert amx_linear(x[:0], p, 20).shape == (0, 20)
    # no inputs at all: zeros (not a crash)
    assert torch.equal(amx_linear(x[:, :0], pack_weight(w[:, :0]), 20), torch.zeros(6, 20, dtype=torch.bfloat16))


@needs_kernel
def test_amx_linear_refuses_a_weight_packed_for_other_shapes():
    x, w = _inputs(2, 40, 64)
    p = pack_weight(w)
    with pytest.raises(RuntimeError, match="packed by pack_weight"):
        torch.ops.qwenpd_amx.linear(x, p, 70)
    with pytest.raises(RuntimeError, match="packed by pack_weight"):
        torch.ops.qwenpd_amx.linear(torch.zeros(2, 96, dtype=torch.bfloat16), p, 40)
    with pytest.raises(RuntimeError, match="x must be bf16"):
        torch.ops.qwenpd_amx.linear(x.float(), p, 40)


def test_the_reference_by_hand():
    x = torch.tensor([[1.0, 2.0, -0.5]], dtype=torch.bfloat16)
    w = torch.tensor([[3.0, -4.0, 8.0], [0.5, 0.25, 2.0]], dtype=torch.bfloat16)
    assert torch.equal(naive_linear(x, w), torch.tensor([[3 - 8 - 4.0, 0.5 + 0.5 - 1.0]], dtype=torch.bfloat16))


def _int8_inputs(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).bfloat16()
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return x, q, (torch.rand(n, generator=gen) / 64 + 1e-4).bfloat16()


def _check_int8(x, q, scale):
    from qwenpd.kernels.amx_linear import amx_linear_int8, pack_int8_weight

    got = amx_linear_int8(x, pack_int8_weight(q), scale, q.shape[0])
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], q.shape[0])
    exact = (x.double() @ q.double().T) * scale.double()
    bound = (x.double().abs() @ q.double().abs().T) * scale.double()
    assert ((got.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + x.shape[1] * 2.0 ** -24 * bound).all()
    return got


def test_the_int8_layout_is_the_bf16_one_in_the_conversions_order():
    """pack_int8_weight holds each 64 values where the byte-table conversion (lanes interleaved by unpacklo/hi)
    puts them back in pack_weight's order."""
    from qwenpd.kernels.amx_linear import pack_int8_weight

    for shape in ((40, 96), (17, 33), (5, 7)):
        q = torch.randint(-127, 128, shape, dtype=torch.int8)
        lanes = pack_int8_weight(q).reshape(-1, 4, 16)  # 4 lanes of 16 bytes: unpacklo takes bytes 0..7, hi 8..15
        converted = torch.cat([lanes[:, :, :8].reshape(-1, 32), lanes[:, :, 8:].reshape(-1, 32)], dim=1)
        assert torch.equal(converted.reshape(pack_weight(q.float()).shape).float(), pack_weight(q.float()).float())


@needs_kernel
@pytest.mark.parametrize("k", [1, 33, 64, 1000, 3072])
@pytest.mark.parametrize("n", [1, 17, 32, 100])
def test_amx_linear_int8_is_the_scaled_sum(n, k):
    for m in (1, 2, 16, 17, 32, 33, 70):  # up to 32 rows a weight tile is converted in L1, more: a block once
        _check_int8(*_int8_inputs(m, n, k, seed=m))


@needs_kernel
def test_an_int8_row_is_the_same_bits_alone_in_any_batch_and_thread_count():
    from qwenpd.kernels.amx_linear import amx_linear_int8, pack_int8_weight

    x, q, scale = _int8_inputs(200, 203, 1024, seed=7)
    p = pack_int8_weight(q)
    every = amx_linear_int8(x, p, scale, 203)
    for rows in (1, 2, 8, 16, 17, 31, 32, 33, 64, 65, 128, 200):
        for start in (0, 200 - rows):
            assert torch.equal(amx_linear_int8(x[start:start + rows], p, scale, 203), every[start:start + rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(amx_linear_int8(x, p, scale, 203), every)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(amx_linear_int8(x, pack_int8_weight(q[9:150]), scale[9:150], 141), every[:, 9:150])
