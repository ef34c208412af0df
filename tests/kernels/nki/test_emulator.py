"""The NKI emulator: documented semantics of the calls it models, and every hardware limit it enforces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwenpd.kernels.nki import emulator as nki
from qwenpd.kernels.nki.backend import load_kernels, real_nki_available, resolve_mode
from qwenpd.kernels.nki.emulator.core import PSUM_PARTITION_BYTES, SBUF_PARTITION_BYTES, ConstraintError, Ledger
from qwenpd.kernels.nki.layout import constants

nl, nisa = nki.language, nki.isa
F32 = nl.float32


def sb(*shape):
    return nl.ndarray(shape, dtype=F32, buffer=nl.sbuf)


def ps(*shape):
    return nl.ndarray(shape, dtype=F32, buffer=nl.psum)


def loaded(x_hbm, *shape):
    t = sb(*shape)
    nisa.dma_copy(dst=t, src=x_hbm)
    return t


def stored(t):
    out = nl.ndarray(t.shape, dtype=F32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


def test_matmul_is_stationary_transposed_times_moving_and_accumulates_in_psum():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 32), dtype=np.float32), rng.standard_normal((64, 100), dtype=np.float32)

    def kernel(a_hbm, b_hbm):
        a_sb, b_sb, acc, out = loaded(a_hbm, 64, 32), loaded(b_hbm, 64, 100), ps(32, 100), sb(32, 100)
        nisa.nc_matmul(dst=acc, stationary=a_sb, moving=b_sb, accumulate=False)
        nisa.nc_matmul(dst=acc, stationary=a_sb, moving=b_sb, accumulate=True)
        nisa.tensor_copy(dst=out, src=acc)
        return stored(out)

    np.testing.assert_allclose(nki.simulate(kernel)(a, b), 2 * a.T @ b, rtol=1e-5, atol=1e-5)


def test_elementwise_calls_follow_their_doc_formulas():
    x = np.arange(8, dtype=np.float32).reshape(4, 2) - 3

    def kernel(x_hbm):
        t, col, out = loaded(x_hbm, 4, 2), sb(4, 1), sb(4, 2)
        nisa.tensor_copy(dst=col, src=t[:, 1:2])
        nisa.tensor_scalar(dst=out, data=t, op0=nl.subtract, operand0=col, reverse0=True, op1=nl.multiply, operand1=2.0)
        nisa.scalar_tensor_tensor(dst=out, data=out, op0=nl.add, operand0=1.0, op1=nl.maximum, operand1=t)
        nisa.activation(dst=out, op=nl.exp, data=out, bias=col, scale=-1.0)
        return stored(out)

    step = np.maximum((x[:, 1:2] - x) * 2 + 1, x)
    np.testing.assert_allclose(nki.simulate(kernel)(x), np.exp(-step + x[:, 1:2]), rtol=1e-6)


def test_new_tensors_hold_nan_so_unwritten_reads_show():
    def kernel():
        return stored(sb(2, 2))

    assert np.isnan(nki.simulate(kernel)()).all()


def test_a_tile_allocated_in_a_loop_takes_one_buffer():
    def kernel():
        for _ in nl.affine_range(40):  # 40 x one PSUM bank would overflow if each iteration took its own
            acc = ps(128, 512)
            nisa.memset(dst=acc, value=0.0)
        return stored(sb(1, 1))

    ledger = Ledger()
    nki.simulate(kernel, ledger)()
    assert ledger.used(nl.psum) == 2048


# One kernel per enforced limit; each breaks exactly one rule.
def _partition_dim():
    sb(256, 4)


def _stationary_free():
    nisa.nc_matmul(dst=ps(128, 4), stationary=sb(8, 129), moving=sb(8, 4), accumulate=False)


def _moving_free():
    nisa.nc_matmul(dst=ps(4, 513), stationary=sb(8, 4), moving=sb(8, 513), accumulate=False)


def _contraction():
    nisa.nc_matmul(dst=ps(4, 4), stationary=sb(8, 4), moving=sb(16, 4), accumulate=False)


def _matmul_dst_in_sbuf():
    nisa.nc_matmul(dst=sb(4, 4), stationary=sb(8, 4), moving=sb(8, 4), accumulate=False)


def _matmul_operand_in_psum():
    nisa.nc_matmul(dst=ps(4, 4), stationary=ps(8, 4), moving=sb(8, 4), accumulate=False)


def _dst_crosses_bank():
    nisa.nc_matmul(dst=ps(4, 1024)[:, 256:768], stationary=sb(8, 4), moving=sb(8, 512), accumulate=False)


def _implicit_accumulate():
    nisa.nc_matmul(dst=ps(4, 4), stationary=sb(8, 4), moving=sb(8, 4))


def _psum_capacity():
    ps(128, 4097)  # 16 KiB + 4 B per partition


def _sbuf_capacity():
    half = SBUF_PARTITION_BYTES // 8  # fp32 elements in half the budget
    sb(128, half), sb(128, half + 1)


def _dma_from_psum():
    nisa.dma_copy(dst=sb(4, 4), src=ps(4, 4))


def _both_inputs_in_psum():
    nisa.tensor_tensor(dst=sb(4, 4), data1=ps(4, 4), data2=ps(4, 4), op=nl.add)


def _start_partition():
    nisa.tensor_copy(dst=sb(128, 4)[0:64], src=sb(128, 4)[16:80])


def _strided_partitions():
    sb(128, 4)[0:128:2]


def _memset_type():
    nisa.memset(dst=sb(4, 4), value=1)


def _compute_on_hbm():
    nisa.tensor_copy(dst=sb(4, 4), src=nl.ndarray((4, 4), dtype=F32, buffer=nl.shared_hbm))


def _vector_operand_shape():
    nisa.tensor_scalar(dst=sb(4, 4), data=sb(4, 4), op0=nl.multiply, operand0=sb(4, 2))


def _output_not_shared_hbm():
    return nl.ndarray((4, 4), dtype=F32, buffer=nl.private_hbm)


LIMITS = [
    ("partition-dim", _partition_dim, "partition dimension 256 exceeds 128"),
    ("matmul-stationary-free", _stationary_free, "stationary free size 129 exceeds 128"),
    ("matmul-moving-free", _moving_free, "moving free size 513 exceeds 512"),
    ("matmul-contraction", _contraction, "contract over 8 and 16 partitions"),
    ("matmul-dst-not-psum", _matmul_dst_in_sbuf, "nc_matmul dst must be in psum"),
    ("matmul-operand-in-psum", _matmul_operand_in_psum, "nc_matmul stationary must be in sbuf"),
    ("matmul-dst-crosses-bank", _dst_crosses_bank, "crosses a 2 KiB PSUM bank"),
    ("matmul-implicit-accumulate", _implicit_accumulate, "accumulate=True or False"),
    ("psum-capacity", _psum_capacity, "psum overflow"),
    ("sbuf-capacity", _sbuf_capacity, "sbuf overflow"),
    ("dma-from-psum", _dma_from_psum, "dma_copy src must be in sbuf/private_hbm/shared_hbm"),
    ("tensor-tensor-both-psum", _both_inputs_in_psum, "both in PSUM"),
    ("start-partition", _start_partition, "must start at partition"),
    ("strided-partitions", _strided_partitions, "cannot be strided"),
    ("memset-type", _memset_type, "does not match dst dtype"),
    ("compute-on-hbm", _compute_on_hbm, "tensor_copy src must be in sbuf/psum"),
    ("vector-operand-shape", _vector_operand_shape, r"must be a \(4, 1\) vector"),
    ("output-not-shared-hbm", _output_not_shared_hbm, "nl.shared_hbm"),
]


@pytest.mark.parametrize("kernel, message", [pytest.param(k, m, id=i) for i, k, m in LIMITS])
def test_each_limit_raises(kernel, message):
    with pytest.raises(ConstraintError, match=message):
        nki.simulate(kernel)()


def test_a_ninth_psum_bank_overflows():
    def kernel():
        ps(128, 2048)  # four banks
        ps(128, 2048)  # four more: the whole PSUM
        ps(128, 1)  # rounds up to a ninth bank

    with pytest.raises(ConstraintError, match="psum overflow"):
        nki.simulate(kernel)()


@pytest.mark.parametrize("name", ["deltanet_chunk", "deltanet_step"])
def test_the_kernels_fit_on_chip(name):
    """The real kernels under the ledger: PSUM within its 8 banks, SBUF within the budget."""
    rng = np.random.default_rng(0)
    n, t, dk, dv = 2, 256, 128, 128
    if name == "deltanet_chunk":
        args = [rng.standard_normal((n, t, dk), dtype=np.float32) * 0.05 for _ in range(2)]
        args += [rng.standard_normal((n, t, dv), dtype=np.float32), -np.ones((n, t, 1), np.float32),
                 np.full((n, t, 1), 0.5, np.float32), np.zeros((n, dk, dv), np.float32)]
        kernel = load_kernels("emulator")[name].deltanet_chunk_fwd
    else:
        args = [rng.standard_normal((n, dk, 1), dtype=np.float32) * 0.05 for _ in range(2)]
        args += [rng.standard_normal((n, 1, dv), dtype=np.float32), -np.ones((n, 1, 1), np.float32),
                 np.full((n, 1, 1), 0.5, np.float32), np.zeros((n, dk, dv), np.float32)]
        kernel = load_kernels("emulator")[name].deltanet_step_fwd
    ledger = Ledger()
    outs = nki.simulate(kernel, ledger)(*args, constants(), heads_per_key=1)
    assert all(np.isfinite(o).all() for o in outs)
    assert ledger.used(nl.psum) <= PSUM_PARTITION_BYTES and ledger.used(nl.sbuf) <= SBUF_PARTITION_BYTES
    if name == "deltanet_chunk":
        assert ledger.used(nl.psum) == 7 * 2048  # seven of the eight banks (see the kernel's PSUM tiles)


def test_one_source_binds_to_each_backend():
    chunk = load_kernels("emulator")["deltanet_chunk"]
    assert chunk.nl is nki.language and chunk.nisa is nki.isa
    if real_nki_available():
        import nki as real

        assert load_kernels("simulate")["deltanet_chunk"].nl is real.language
    else:
        with pytest.raises(ValueError, match="needs the Neuron SDK"):
            resolve_mode("simulate")
        assert resolve_mode(None) == "emulator"


def test_importing_never_imports_nki():
    """Importing the package never imports `nki`; nor do the kernel modules when bound to the emulator."""
    code = ("import os, sys; import qwenpd.kernels.nki; assert 'nki' not in sys.modules; "
            "os.environ['QWENPD_NKI_MODE'] = 'emulator'; "
            "import qwenpd.kernels.nki.deltanet_chunk, qwenpd.kernels.nki.deltanet_step; "
            "assert 'nki' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "QWENPD_NKI_MODE"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3], env=env)
