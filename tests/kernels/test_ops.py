"""The qwenpd:: custom ops: torch.library.opcheck (schema, fake tensors, AOT dispatch), equality with the torch
kernels they wrap, the padding (mask) contract, and the paged attention kernels against the dense reference."""

from __future__ import annotations

import pytest
import torch

from qwenpd.kernels import causal_conv1d, chunk_gated_delta_rule, naive_gated_delta_rule, ops
from qwenpd.kernels.paged_attention import naive_paged_attention
from tests.kernels.helpers import assert_close, gdn_inputs

OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def _gdn(seq=20, batch=2):
    x = gdn_inputs(batch, seq, 2, 4, 16, 8, with_state=True, seed=seq)
    return x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"]


def _pools(pages=9, page=4, hkv=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(pages, hkv, page, dim, generator=gen), torch.randn(pages, hkv, page, dim, generator=gen)


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_opcheck_chunk_gated_delta_rule():
    args = _gdn()
    _opcheck(torch.ops.qwenpd.chunk_gated_delta_rule.default, args)
    _opcheck(torch.ops.qwenpd.chunk_gated_delta_rule.default, (*args, torch.arange(20)[None].expand(2, -1) < 13))


def test_opcheck_step_gated_delta_rule():
    q, k, v, g, beta, s0 = _gdn(seq=1)
    _opcheck(torch.ops.qwenpd.step_gated_delta_rule.default, (q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0))


def test_opcheck_conv():
    x, w, s = torch.randn(2, 7, 12), torch.randn(12, 4), torch.randn(2, 12, 3)
    _opcheck(torch.ops.qwenpd.causal_conv1d.default, (x, w, s))
    _opcheck(torch.ops.qwenpd.causal_conv1d.default, (x, w, s, torch.arange(7)[None].expand(2, -1) < 5))
    _opcheck(torch.ops.qwenpd.causal_conv1d_update.default, (x[:, 0], w, s))


def test_opcheck_paged_attention():
    kp, vp = _pools()
    q = torch.randn(5, 4, 8)
    _opcheck(torch.ops.qwenpd.write_kv.default, (kp, vp, torch.tensor([4, 5, 6, 9, 30]), q[:, :2], q[:, 2:]))
    _opcheck(torch.ops.qwenpd.paged_attention_prefill.default, (q, kp, vp, torch.tensor([3, 1, 0]),
                                                                torch.tensor([3]), 0.3))
    _opcheck(torch.ops.qwenpd.paged_attention_decode.default, (q[:3], kp, vp, torch.tensor([[1, 2], [3, 0], [4, 5]]),
                                                               torch.tensor([7, 1, 8]), 0.3))


def test_ops_equal_the_kernels_they_wrap():
    q, k, v, g, beta, s0 = _gdn()
    o, s = ops.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    o_ref, s_ref = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    x, w, st = torch.randn(2, 7, 12), torch.randn(12, 4), torch.randn(2, 12, 3)
    y, new = ops.causal_conv1d(x, w, st)
    y_ref, new_ref = causal_conv1d(x, w, st)
    assert torch.equal(y, y_ref) and torch.equal(new, new_ref)


@pytest.mark.parametrize("real", [1, 2, 9, 20], ids=lambda n: f"real{n}")
def test_padding_changes_no_state(real):
    """A chunk padded past its `real` tokens (mask) leaves exactly the state of the unpadded chunk."""
    q, k, v, g, beta, s0 = _gdn(seq=20)
    mask = (torch.arange(20) < real)[None].expand(2, -1)
    o, s = ops.chunk_gated_delta_rule(q, k, v, g, beta, s0, mask)
    o_ref, s_ref = naive_gated_delta_rule(q[:, :real], k[:, :real], v[:, :real], g[:, :real], beta[:, :real],
                                          initial_state=s0)
    assert_close(o[:, :real], o_ref, atol=1e-5, what="outputs")
    assert_close(s, s_ref, atol=1e-5, what="state")
    x, w, st = torch.randn(2, 20, 12), torch.randn(12, 4), torch.randn(2, 12, 3)
    y, new = ops.causal_conv1d(x, w, st, mask)
    y_ref, new_ref = causal_conv1d(x[:, :real], w, st)
    assert_close(y[:, :real], y_ref, atol=1e-6, what="conv outputs")  # same sums, other vector blocking
    assert torch.equal(new, new_ref)


def _table(n_tokens, page, pages, gen):
    """A random non-null page list (page 0 is the null page) long enough for n_tokens."""
    return (torch.randperm(pages - 1, generator=gen)[: -(-n_tokens // page)] + 1).tolist()


DECODE_KERNELS = ["decode_by_sequence", "decode_tiles"]  # CPU's; accelerators' (run here too)


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@pytest.mark.parametrize("page", [1, 4, 16], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_decode_matches_reference(page, dtype, kernel, monkeypatch):
    from qwenpd.kernels.paged_attention import paged

    monkeypatch.setattr(paged, "TILE_TOKENS", 2 * page)  # several tiles: the online softmax merges them
    monkeypatch.setattr(paged, "CPU_BLOCK_TOKENS", 2 * page)  # several blocks (the CPU path's tiles)
    gen = torch.Generator().manual_seed(page)
    pages, hkv, hq, dim = 40, 2, 6, 8
    kp, vp = (t.to(dtype) for t in _pools(pages, page, hkv, dim, seed=page))
    lens = [1, page, 3 * page + 1, 5]
    tables = [_table(n, page, pages, gen) for n in lens]
    width = max(len(t) for t in tables) + 1  # padded with the null page
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), hq, dim, generator=gen).to(dtype)
    o = getattr(paged, kernel)(q, kp, vp, bt, torch.tensor(lens), 0.35)
    assert o.dtype == dtype
    if kernel == "decode_by_sequence":  # what the op runs on CPU
        assert torch.equal(o, ops.paged_attention_decode(q, kp, vp, bt, torch.tensor(lens), 0.35))
    for b, n in enumerate(lens):
        ref = naive_paged_attention(q[b:b + 1], kp, vp, tables[b], [n - 1], 0.35)
        assert_close(o[b:b + 1], ref, atol=1e-5 if dtype == torch.float32 else 2e-2, what=f"seq {b}")


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_decode_row_is_the_same_bits_in_any_batch_and_table_width(dtype, kernel, monkeypatch):
    """A sequence's output is the same bits alone with its own pages, in a table padded far past its context,
    and beside a longer sequence (tiles: whose tiles it must then walk through, the loop's running state, not the
    one-tile shortcut)."""
    from qwenpd.kernels.paged_attention import paged

    decode = getattr(paged, kernel)
    page = 4
    monkeypatch.setattr(paged, "TILE_TOKENS", 2 * page)
    gen = torch.Generator().manual_seed(3)
    pages, hkv, hq, dim = 60, 2, 6, 8
    kp, vp = (t.to(dtype) for t in _pools(pages, page, hkv, dim, seed=3))
    for n in (3, 2 * page, 2 * page + 1, 5 * page + 2):
        table = _table(n, page, pages, gen)
        q = torch.randn(1, hq, dim, generator=gen).to(dtype)
        alone = decode(q, kp, vp, torch.tensor([table]), torch.tensor([n]), 0.35)
        wide = decode(q, kp, vp, torch.tensor([table + [0] * 9]), torch.tensor([n]), 0.35)
        other = _table(11 * page, page, pages, gen)
        width = len(other) + 2
        bt = torch.tensor([table + [0] * (width - len(table)), other + [0] * (width - len(other))])
        pair = decode(torch.cat([q, torch.randn(1, hq, dim, generator=gen).to(dtype)]), kp, vp, bt,
                      torch.tensor([n, 11 * page]), 0.35)
        assert torch.equal(alone, wide), n
        assert torch.equal(alone[0], pair[0]), n


@pytest.mark.parametrize("block", [4, 8, 4096], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attend_pages_causal_rows_match_reference(block, dtype, monkeypatch):
    """attend_pages with causal rows (the MTP head's drafting rows) over one or several blocks: each row sees the
    tokens up to its position, whatever the block size; a block size that is not a whole number of pages is
    rounded down to one."""
    from qwenpd.kernels.paged_attention import paged

    monkeypatch.setattr(paged, "CPU_BLOCK_TOKENS", block)
    page, pages, hkv, hq, dim = 4, 30, 2, 6, 8
    gen = torch.Generator().manual_seed(block)
    kp, vp = (t.to(dtype) for t in _pools(pages, page, hkv, dim, seed=block))
    end = 37
    table = _table(end, page, pages, gen)
    positions = [30, 31, 32, 33, 34, 35, 36]
    q = torch.randn(len(positions), hq, dim, generator=gen)
    o = paged.attend_pages(q, kp, vp, torch.tensor(table), end, 0.35, torch.tensor(positions))
    ref = naive_paged_attention(q.to(dtype), kp, vp, table, positions, 0.35)
    assert o.dtype == torch.float32
    assert_close(o, ref, atol=1e-5 if dtype == torch.float32 else 2e-2, what=f"block {block}")
    one = paged.attend_pages(q[-1:], kp, vp, torch.tensor(table), end, 0.35)  # a decode row: every token
    assert_close(one, ref[-1:], atol=1e-5 if dtype == torch.float32 else 2e-2, what="decode row")


@pytest.mark.parametrize("start,t", [(0, 5), (7, 6), (16, 1)], ids=lambda v: str(v))
def test_paged_prefill_matches_reference(start, t):
    gen = torch.Generator().manual_seed(start)
    page, pages = 4, 12
    kp, vp = _pools(pages, page, 2, 8, seed=start)
    table = _table(start + t, page, pages, gen)
    q = torch.randn(t, 4, 8, generator=gen)
    bt = torch.tensor(table + [0, 0])
    o = ops.paged_attention_prefill(q, kp, vp, bt, torch.tensor([start]), 0.35)
    ref = naive_paged_attention(q, kp, vp, table, list(range(start, start + t)), 0.35)
    assert_close(o, ref, atol=1e-5)


def test_write_kv_touches_only_its_slots():
    kp, vp = _pools()
    before_k, before_v = kp.clone(), vp.clone()
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, 0, 13])
    ops.write_kv(kp, vp, slots, k, v)
    def flat(pool):  # [num_pages * page_size, Hkv, D], token-major
        return pool.transpose(1, 2).flatten(0, 1)

    assert torch.equal(flat(kp)[slots], k) and torch.equal(flat(vp)[slots], v)
    rest = torch.ones(flat(kp).shape[0], dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(flat(kp)[rest], flat(before_k)[rest])
    assert torch.equal(flat(vp)[rest], flat(before_v)[rest])


@pytest.mark.parametrize("width", [2, 9], ids=["one-tile", "wide"])
def test_decode_ops_are_traced_into_graphs_except_attention(width):
    """ops.decode_*: on CPU a compiled graph traces their torch code (fused by inductor) instead of calling the
    opaque op; paged attention never (the op's kernel at every width: batch invariance, kernels/ops.py)."""
    *one_token, state = _gdn(seq=1)
    q, k, v, g, beta = (t[:, 0] for t in one_token)  # [B, H, ...]: the token axis dropped
    kp, vp = _pools(pages=12, page=64)  # width 2: 128 tokens, one tile; width 9: 576 tokens, two tiles
    bt, lens = torch.randint(1, 12, (2, width)), torch.tensor([3, 60 * width])
    qa = torch.randn(2, 4, 8)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def step(q, k, v, g, beta, state, qa, bt, lens):
        o = ops.decode_step_gated_delta_rule(q, k, v, g, beta, state)
        return o, ops.decode_paged_attention(qa, kp, vp, bt, lens, 0.3)

    eager_state = state.clone()
    want = step(q, k, v, g, beta, eager_state, qa, bt, lens)
    torch._dynamo.reset()
    got = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, g, beta, state, qa, bt, lens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(state, eager_state)
    assert not any("step_gated_delta_rule" in t for t in targets)  # traced: plain aten ops
    assert any("paged_attention_decode" in t for t in targets)


def test_ops_run_on_meta():
    q, k, v, g, beta, s0 = (t.to("meta") for t in _gdn())
    o, s = ops.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    assert o.device.type == "meta" and o.shape == v.shape and s.shape == s0.shape and s.dtype == torch.float32
    kp, vp = (t.to("meta") for t in _pools())
    o = ops.paged_attention_decode(torch.empty(3, 4, 8, device="meta"), kp, vp,
                                   torch.zeros(3, 2, dtype=torch.long, device="meta"),
                                   torch.ones(3, dtype=torch.long, device="meta"), 0.3)
    assert o.shape == (3, 4, 8) and o.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_equals_torch_kernels_on_cuda():
    from qwenpd.kernels import fla

    if not fla.available():
        pytest.skip("flash-linear-attention is not installed")
    from qwenpd.engine.check_device import FLA_KERNEL_ATOL

    chunk_err, _ = fla.check_equal("cuda")  # FLA's recurrent step is not used (kernels/ops.py says why)
    assert chunk_err < FLA_KERNEL_ATOL
