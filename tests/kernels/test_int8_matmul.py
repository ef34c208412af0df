"""The weight-only int8 CPU kernel (kernels/int8_matmul/cpu.cpp) against its plain reference: the sum in float64
rounded once; every row's bits independent of the rows beside it, the thread count and the weight rows' tiling."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenpd.kernels.int8_matmul import available, int8_matmul, naive_int8_matmul
from qwenpd.kernels import cpp_build
from qwenpd.kernels.int8_matmul import cpu
from qwenpd.kernels.int8_matmul.cpu import DISABLE_ENV

needs_kernel = pytest.mark.skipif(not available(), reason=f"no int8 CPU kernel here: {cpu.why_not}")


def _inputs(m, n, k, seed=0, q_range=127):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    q = torch.randint(-q_range, q_range + 1, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) / 64 + 1e-4).to(torch.bfloat16)
    return x, q, scale


def _check(x, q, scale):
    got = int8_matmul(x, q, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], q.shape[0])
    exact = (x.double() @ q.double().T) * scale.double()
    # fp32 sums (cancellation: K terms of |x q| at 2^-24) then one rounding to bf16 (2^-8 relative)
    bound = (x.double().abs() @ q.double().abs().T) * scale.double()
    tol = 2.0 ** -8 * exact.abs() + x.shape[1] * 2.0 ** -24 * bound
    assert ((got.double() - exact).abs() <= tol).all()
    return got


@needs_kernel
@pytest.mark.parametrize("k", [1, 5, 63, 64, 65, 130, 1000, 3072])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 64])
def test_int8_matmul_is_the_scaled_sum(n, k):
    for m in (1, 2, 5, 8, 9, 19):
        _check(*_inputs(m, n, k, seed=m))


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 24), n=st.integers(1, 40), k=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_int8_matmul_any_shape(m, n, k, seed):
    _check(*_inputs(m, n, k, seed))


@needs_kernel
def test_int8_matmul_at_the_ends_of_the_range():
    """q = +-127 everywhere, x of large and tiny (normal) magnitude, zeros: the table conversion is exact."""
    x, q, scale = _inputs(6, 33, 257, seed=4)
    q = torch.where(q >= 0, 127, -127).to(torch.int8)
    x[1] *= 2.0 ** 40
    x[2] *= 2.0 ** -40
    x[3] = 0
    got = _check(x, q, scale)
    assert (got[3] == 0).all()
    # every value of q against one-hot x columns: each output is q[n, k] * scale[n] exactly
    q = torch.arange(-127, 128, dtype=torch.int8).reshape(1, -1).repeat(3, 1)
    eye = torch.eye(255).to(torch.bfloat16)
    assert torch.equal(int8_matmul(eye, q, torch.ones(3, dtype=torch.bfloat16)), q.T.to(torch.bfloat16))


@needs_kernel
def test_a_row_is_the_same_bits_alone_in_any_batch_and_thread_count():
    x, q, scale = _inputs(40, 203, 1100, seed=5)
    every = int8_matmul(x, q, scale)
    for rows in (1, 2, 3, 7, 8, 9, 16, 17, 33):
        for start in (0, 40 - rows, 3):
            part = x[start:start + rows]
            assert torch.equal(int8_matmul(part, q, scale), every[start:start + rows]), (rows, start)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(int8_matmul(x, q, scale), every), f"{n} threads"
    finally:
        torch.set_num_threads(threads)
    # a weight-row slice (a TP shard) gives the same rows' bits: tiling over weight rows does not matter
    assert torch.equal(int8_matmul(x, q[7:200].contiguous(), scale[7:200]), every[:, 7:200])


@needs_kernel
def test_int8_matmul_takes_strided_inputs_and_no_rows():
    x, q, scale = _inputs(5, 20, 128, seed=6)
    wide = torch.zeros(5, 256, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(int8_matmul(wide[:, ::2], q, scale), int8_matmul(x, q, scale))
    assert int8_matmul(x[:0], q, scale).shape == (0, 20)


@needs_kernel
def test_int8_matmul_refuses_what_it_does_not_compute():
    x, q, scale = _inputs(2, 8, 64)
    with pytest.raises(RuntimeError, match="x must be bf16"):
        int8_matmul(x.float(), q, scale)
    with pytest.raises(RuntimeError, match="q must be int8"):
        int8_matmul(x, q.to(torch.int16), scale)
    with pytest.raises(RuntimeError, match="x's K"):
        int8_matmul(x[:, :32], q, scale)
    with pytest.raises(RuntimeError, match="scale must be bf16"):
        int8_matmul(x, q, scale.float())


def test_the_reference_by_hand():
    x = torch.tensor([[1.0, 2.0, -0.5], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    q = torch.tensor([[3, -4, 127], [-127, 1, 2]], dtype=torch.int8)
    scale = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)
    want = torch.tensor([[(3 - 8 - 63.5) * 0.5, (-127 + 2 - 1) * 2.0], [0.0, 0.0]], dtype=torch.bfloat16)
    assert torch.equal(naive_int8_matmul(x, q, scale), want)


def test_switched_off_decode_steps_take_atens_kernel():
    """QWENPD_INT8_KERNEL=0: no build, and decode-step rows take aten's weight-only kernel (engine/linear.py; with
    QWENPD_AMX_LINEAR=0 too on a CPU with AMX, whose own kernel would take them)."""
    code = ("import torch; from qwenpd.engine.linear import int8_step_kernel; "
            "print(int8_step_kernel(torch.zeros(1, 64, dtype=torch.bfloat16)))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, DISABLE_ENV: "0", "QWENPD_AMX_LINEAR": "0"}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()[-1]
    assert out == "aten"


def test_a_dead_builders_lock_file_is_removed_under_our_lock(tmp_path):
    """torch waits without end on the lock file of a builder killed mid-build; whoever holds our flock is the only
    builder alive, so a lock file it finds is removed before torch's loader runs."""
    from types import SimpleNamespace

    seen = []
    loader = SimpleNamespace(_get_build_directory=lambda name, verbose: str(tmp_path),
                             load=lambda **kw: seen.append((kw["name"], (tmp_path / "lock").exists())))
    (tmp_path / "lock").touch()
    cpp_build._build(loader, "x", cpu.SOURCE, [])
    assert seen == [("x", False)]
