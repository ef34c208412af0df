"""Linear in bf16 on CPU: the fp32 path of a CPU without bf16 instructions (`wide`) equals the bf16 kernel within
one bf16 rounding; few rows stay on the packed bf16 weight, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenpd.engine.layers import WIDE_ROWS, Linear


@pytest.mark.parametrize("rows", [1, WIDE_ROWS - 1, WIDE_ROWS, 64, 300], ids=lambda r: f"N{r}")
def test_wide_linear_equals_the_bf16_kernel(rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(384, 256, generator=g) / 16).bfloat16()
    x = torch.randn(rows, 256, generator=g)  # fp32 activations: rounded to bf16 at the matmul input
    ref = F.linear(x.bfloat16(), w)
    plain, wide = Linear(w, wide=False), Linear(w, wide=True)
    got = wide(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 384)
    assert torch.equal(plain(x), ref)
    if rows < WIDE_ROWS:
        assert torch.equal(got, ref)  # the packed bf16 weight, not the fp32 copy
    else:  # same operands and fp32 sums; the bf16 kernel's summation order may round the other way, by one ulp
        ulp = ref.float().abs().clamp_min(1e-3) * 2.0 ** -7
        assert not got.isnan().any() and ((got.float() - ref.float()).abs() <= ulp).all()


def test_wide_is_for_bf16_on_cpu_only():
    assert Linear(torch.randn(8, 8), wide=None).wide is None  # fp32 weights never get a copy
    assert Linear(torch.randn(8, 8, dtype=torch.bfloat16, device="meta")).wide is None
