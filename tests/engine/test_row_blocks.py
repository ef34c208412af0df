"""Row-wise fp32 chains over a long prefill chunk run in blocks of rows on CPU (engine/layers.py by_row_blocks):
every row comes out the same bits as from the chain over the whole tensor at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenpd.engine import layers


@pytest.mark.parametrize("rows", [1, layers.ROW_BLOCK, layers.ROW_BLOCK + 1, 3 * layers.ROW_BLOCK + 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_blocked_chains_equal_the_whole_tensor_chain(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.rand(96, generator=gen) + 0.5
    x = torch.randn(rows, 96, generator=gen) * 3  # the fp32 residual stream
    assert torch.equal(layers.rms_norm(x, weight, 1e-6, dtype), layers._rms_norm(x, weight, 1e-6, dtype))
    heads = torch.randn(rows, 4, 96, generator=gen).to(dtype)  # q/k norms: per head, over the last dim
    assert torch.equal(layers.rms_norm(heads, weight, 1e-6), layers._rms_norm(heads, weight, 1e-6, dtype))
    # views of one projection; rows of whole vector spans, as in the models (within a row torch's vector loop
    # and its scalar tail compute silu to different bits, so a row's layout must not move an element between them)
    gate, up = torch.randn(rows, 4 * layers.VECTOR_SPAN, generator=gen).to(dtype).chunk(2, dim=-1)
    assert torch.equal(layers.swiglu(gate, up, dtype), (F.silu(gate.float()) * up.float()).to(dtype))
