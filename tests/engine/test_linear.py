"""Linear on CPU: the packed weights behind qwenpd::packed_linear. The packed bf16 weight gives F.linear's bf16
result bit for bit; on a CPU without bf16 instructions (`wide`) rows multiply the same bf16-rounded inputs by a
packed fp32 copy and return fp32 sums, which round to F.linear's bf16 result or one ulp beside it. fp32 weights are
packed too. Every row's result is the same bits whatever the rows beside it (batch invariance)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from qwenpd.engine import linear as linear_mod
from qwenpd.engine.linear import Linear


@pytest.mark.parametrize("rows", [1, 2, 8, 64, 300], ids=lambda r: f"N{r}")
def test_packed_linear_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(384, 256, generator=g) / 16).bfloat16()
    x = torch.randn(rows, 256, generator=g)  # fp32 activations: rounded to bf16 at the matmul input
    ref = F.linear(x.bfloat16(), w)
    plain, wide = Linear(w, wide=False), Linear(w, wide=True)
    assert torch.equal(plain(x), ref)  # the packed bf16 weight at every row count
    got = wide(x)
    assert got.shape == (rows, 384) and not got.isnan().any()
    # fp32 out: exact products of the bf16 operands, fp32 sums (the order may differ from F.linear's)
    assert got.dtype == torch.float32
    exact = F.linear(x.bfloat16().double(), w.double())
    assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    ulp = ref.float().abs().clamp_min(1e-3) * 2.0 ** -7
    assert ((got.bfloat16().float() - ref.float()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype,wide", [(torch.float32, None), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-wide"])
@pytest.mark.parametrize("shape", [(384, 256), (256, 1024), (512, 5120)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_row_is_the_same_bits_among_any_rows(dtype, wide, shape):
    """A decode step of 1 or of 8 sequences gives each sequence the same bits (crash resume replays a sequence in
    another batch). Plain fp32 F.linear (MKL) and oneDNN's one-row kernel both fail this (engine/linear.py)."""
    g = torch.Generator().manual_seed(shape[1])
    lin = Linear((torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(dtype), wide=wide)
    x = torch.randn(40, shape[1], generator=g)
    rows = {n: lin(x[:n]) for n in (1, 2, 3, 8, 17, 40)}
    for n, y in rows.items():
        assert torch.equal(y, rows[40][:n]), f"{n} rows"
        assert torch.equal(lin(x[n - 1]), rows[40][n - 1])  # a 1-D input too


def test_bf16_on_amx_runs_calls_of_the_row_window(monkeypatch):
    """On a CPU with AMX where our kernel (kernels/amx_linear) cannot be built, oneDNN's bf16 kernels sum in an
    order chosen by the row count, so every call runs 16..64 rows (padded, or split): a row's bits are the same
    among any rows, 1 to 150 of them, 1-D input too. Forced here on any CPU (the blocks and padding are what is
    tested; on AMX the kernels too)."""
    from qwenpd.engine import linear

    monkeypatch.setattr(linear, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(linear, "amx_linear_available", lambda: False)  # oneDNN's kernels, as without ours
    monkeypatch.setattr(linear, "_ROW_WINDOWS", {})
    g = torch.Generator().manual_seed(3)
    lin = Linear((torch.randn(96, 640, generator=g) / 640 ** 0.5).bfloat16(), wide=False)
    assert lin._copies.window in (linear.ROW_WINDOW, (16, 16))
    x = torch.randn(150, 640, generator=g)
    whole = lin(x)
    assert whole.shape == (150, 96)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 129):
        assert torch.equal(lin(x[:n]), whole[:n]), f"{n} rows"
    assert torch.equal(lin(x[7]), whole[7])
    assert lin(x[:0]).shape == (0, 96)
    assert Linear(torch.randn(96, 640).float())._copies.window in (None, linear.FROM_TWO)  # fp32: no AMX kernels


def test_bf16_on_amx_takes_our_kernel_in_any_row_count():
    """Where kernels/amx_linear loads (a CPU with AMX-BF16), a bf16 weight is packed for it and called with the rows
    as they come (no window, nothing probed): a row's bits are the same among any rows, and the result is the
    kernel's own on the same packed weight."""
    from qwenpd.engine import linear
    from qwenpd.kernels import amx_linear

    if not (linear.cpu_has_amx() and amx_linear.available()):
        pytest.skip(f"no AMX projection kernel here: {amx_linear.cpu.why_not or 'no AMX'}")
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(100, 640, generator=g) / 640 ** 0.5).bfloat16()
    lin = Linear(w, wide=False)
    assert lin._copies.amx == 100 and lin._copies.window is None
    x = torch.randn(150, 640, generator=g)
    whole = lin(x)
    assert torch.equal(whole, amx_linear.amx_linear(x.bfloat16(), amx_linear.pack_weight(w), 100))
    for n in (1, 2, 15, 16, 17, 33, 64, 129):
        assert torch.equal(lin(x[:n]), whole[:n]), f"{n} rows"
    assert torch.equal(lin(x[7]), whole[7])


def test_packed_linear_compiles_to_the_same_result():
    """A compiled graph calls the same op on the same packed copies (the key is a graph input like a weight)."""
    w = (torch.randn(96, 64) / 8).bfloat16()
    lin = Linear(w, wide=True)
    step = torch.compile(lambda x: lin(x) * 2, fullgraph=True, dynamic=False)
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        assert torch.equal(step(x), lin(x) * 2)


def test_packed_linear_op_contract_and_lifetime():
    lin = Linear(torch.randn(32, 16).bfloat16(), wide=True)
    x = torch.randn(3, 16).bfloat16()
    torch.library.opcheck(torch.ops.qwenpd.packed_linear.default, (x, lin.key, True))
    torch.library.opcheck(torch.ops.qwenpd.packed_linear.default, (x, lin.key, False))
    assert lin.key.untyped_storage().nbytes() == 8 and lin.key.shape == (32, 16)  # the key holds no weight
    handle = int(lin.key[0, 0])
    assert handle in linear_mod._PACKED
    del lin
    gc.collect()
    assert handle not in linear_mod._PACKED  # the copies go with their key
    with pytest.raises(ValueError, match="no packed weight"):
        torch.ops.qwenpd.packed_linear(x, torch.tensor(handle).expand(32, 16), False)


def test_bf16_and_fp32_on_cpu_are_packed():
    assert Linear(torch.randn(8, 8), wide=None).key is not None
    assert Linear(torch.randn(8, 8).half()).key is None  # fp16 multiplies by F.linear
    meta = Linear(torch.randn(8, 8, dtype=torch.bfloat16, device="meta"))
    assert meta.key is None and meta(torch.empty(2, 8, device="meta")).shape == (2, 8)
