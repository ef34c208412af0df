"""Attention over a paged KV cache with static shapes (the compiled paths pad to buckets; nothing here reads a
tensor's value on the host).

Pools are [num_pages, Hkv, page_size, D] per attention layer (a page is a [Hkv, P, D] slice of a prefix-cache
block [Hkv, 256, D], so blocks are copied page by page without re-layout); token j of a sequence lives at flat
slot block_table[j // page_size] * page_size + j % page_size. Page 0 is the engine's null page: padding rows and
padding tokens write there and table padding points there, so no real sequence's KV is touched.

- write_kv: scatter new K/V into their slots (one index_copy_ per pool).
- paged_attention_prefill: one sequence's chunk of T queries against its pages, causal (SDPA with a mask).
- paged_attention_decode: one query per sequence for a whole batch, scores, softmax and weighted sum in fp32.
  On CPU each sequence runs on its own over exactly its context (`attend_pages`: blocks of its pages converted to
  fp32 in this thread's buffers, grouped matmuls, an online softmax across blocks): a row's result depends on
  nothing but its own query, pages and length, so it is the same bits in any batch and any block-table width, and
  no work is spent on padding. That reads the host's copy of context_lens, which an accelerator should not wait
  for; there tiles of pages are gathered for every sequence at once, padded to a fixed width and merged with an
  online softmax, so only one tile at a time is ever converted to fp32 and nothing reads a value on the host.
- attend_pages: the CPU path's attention of one sequence's rows over its pages (the decode op's rows and the MTP
  head's drafting rows, engine/mtp.py).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

TILE_TOKENS = 512  # tokens per sequence gathered per tile in decode
CPU_BLOCK_TOKENS = 4096  # keys per block of attend_pages (rounded down to whole pages)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_pools(k_pool: Tensor, v_pool: Tensor, q: Tensor) -> tuple[int, int]:
    """[num_pages, Hkv, page_size, D] pools matching q [..., Hq, D]; returns (page_size, Hq // Hkv)."""
    _require(k_pool.ndim == 4 and v_pool.shape == k_pool.shape,
             f"k_pool and v_pool must both be [num_pages, Hkv, page_size, D], got {tuple(k_pool.shape)}, "
             f"{tuple(v_pool.shape)}")
    _require(q.shape[-1] == k_pool.shape[3], f"q head dim {q.shape[-1]} != pool head dim {k_pool.shape[3]}")
    hq, hkv = q.shape[-2], k_pool.shape[1]
    _require(hq % hkv == 0, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return k_pool.shape[2], hq // hkv


def write_kv(k_pool: Tensor, v_pool: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """k, v [N, Hkv, D] into the pools at flat slots [N] (int64), in place."""
    page = k_pool.shape[2]
    pages, offsets = slots // page, slots % page
    k_pool[pages, :, offsets] = k.to(k_pool.dtype)
    v_pool[pages, :, offsets] = v.to(v_pool.dtype)


def paged_attention_prefill(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, start: Tensor,
                            scale: float) -> Tensor:
    """A chunk of one sequence; its K/V must already be written.

    Args:
        q: [T, Hq, D] queries at positions start .. start+T-1.
        k_pool, v_pool: [num_pages, Hkv, page_size, D].
        block_table: [W] int64 page ids covering at least start + T tokens of real ones (rest: page 0).
        start: [] or [1] int64 position of the chunk's first token.
        scale: multiplies q.k.

    Returns:
        o [T, Hq, D] in q.dtype (SDPA accumulates in fp32).
    """
    page, _ = check_pools(k_pool, v_pool, q)
    _require(block_table.ndim == 1, f"block_table must be [W], got {tuple(block_table.shape)}")
    t, length = q.shape[0], block_table.shape[0] * page
    keys = k_pool[block_table].transpose(0, 1).flatten(1, 2)  # [Hkv, W*P, D]
    values = v_pool[block_table].transpose(0, 1).flatten(1, 2)
    query_pos = start.reshape(1) + torch.arange(t, device=q.device)  # [T]
    visible = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]  # [T, W*P]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None].to(q.dtype), values[None].to(q.dtype),
                                       attn_mask=visible, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1).contiguous()


def paged_attention_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor,
                           scale: float) -> Tensor:
    """One new token for each of B sequences; their K/V at context_lens - 1 must already be written.

    Args:
        q: [B, Hq, D].
        k_pool, v_pool: [num_pages, Hkv, page_size, D].
        block_tables: [B, W] int64, row b covering context_lens[b] tokens (padding: page 0).
        context_lens: [B] int64 >= 1, tokens each query attends to (itself included).
        scale: multiplies q.k.

    Returns:
        o [B, Hq, D] in q.dtype; scores, softmax and the weighted sum in fp32.
    """
    check_pools(k_pool, v_pool, q)
    batch = q.shape[0]
    _require(block_tables.ndim == 2 and block_tables.shape[0] == batch,
             f"block_tables must be [B={batch}, W], got {tuple(block_tables.shape)}")
    _require(context_lens.shape == (batch,), f"context_lens must be [B={batch}], got {tuple(context_lens.shape)}")
    if q.device.type == "cpu":
        return decode_by_sequence(q, k_pool, v_pool, block_tables, context_lens, scale)
    return decode_tiles(q, k_pool, v_pool, block_tables, context_lens, scale)


def decode_by_sequence(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor,
                       scale: float) -> Tensor:
    """paged_attention_decode one sequence at a time, each over exactly its context (`attend_pages`; module
    docstring)."""
    out = torch.empty_like(q)
    qf = q.float()
    for b, n in enumerate(context_lens.tolist()):
        out[b] = attend_pages(qf[b:b + 1], k_pool, v_pool, block_tables[b], n, scale)[0]
    return out


_scratch = threading.local()


def _cpu_buffers(pool: Tensor, pages: int) -> tuple[Tensor, Tensor, Tensor]:
    """This thread's buffers for a block of `pages` pages of pools shaped as `pool`: a gather buffer [pages, Hkv,
    P, D] in the pool's dtype and fp32 keys and values [Hkv, pages * P, D]. Made once per shape and kept (8 + 2 x 16
    MB on Qwen3.6-27B's shapes, bf16): a fresh block-sized tensor every call is a fresh mmap, page-faulted in
    afresh (at 4K tokens of those shapes that cost more than the attention). Not inference tensors, so that they
    can be written in and out of inference mode."""
    _, hkv, page, dim = pool.shape
    key = (pages, hkv, page, dim, pool.dtype, str(pool.device))
    held = getattr(_scratch, "buffers", None)
    if held is None:
        held = _scratch.buffers = {}
    if key not in held:  # a few shapes at most: a tensor-parallel leader's pools and its MTP head's
        with torch.inference_mode(False):
            held[key] = (torch.empty(pages, hkv, page, dim, dtype=pool.dtype, device=pool.device),
                         *(torch.empty(hkv, pages * page, dim, dtype=torch.float32, device=pool.device)
                           for _ in range(2)))
    return held[key]


def attend_pages(q: Tensor, k_pool: Tensor, v_pool: Tensor, pages: Tensor, end: int, scale: float,
                 positions: Tensor | None = None) -> Tensor:
    """Attention of q [n, Hq, D] (fp32) over one sequence's tokens 0 .. end-1, token j in page pages[j // P] of
    the pools: every row sees all `end` tokens, or with `positions` [n] row i those <= positions[i] (causal rows).
    Returns fp32 [n, Hq, D]; the CPU path of paged_attention_decode.

    Blocks of CPU_BLOCK_TOKENS keys: a block's pages are gathered into this thread's buffer, converted to fp32
    (`_cpu_buffers`), and multiplied as grouped matmuls (query head h reads KV head h // group), an online softmax
    across blocks, so memory is bounded at any context. Against the pages gathered into a fresh fp32 copy and
    SDPA (what this replaced) on Qwen3.6-27B's attention shapes (24 query heads, 4 KV heads, 256 dims, bf16), one
    row on a 2-core EPYC: 0.46 -> 0.37 ms at 512 tokens, 10.8 -> 6.4 ms at 4K, 270 -> 52 ms at 32K
    (docs/performance.md, eleventh round). fp32 matmuls: a bf16 one goes to oneDNN, which builds a kernel for every
    new shape, and the key count grows every step."""
    n, hq, dim = q.shape
    _, hkv, page, _ = k_pool.shape
    group = hq // hkv
    per = max(1, CPU_BLOCK_TOKENS // page)  # pages per block
    gather, k32, v32 = _cpu_buffers(k_pool, per)
    grouped = q.reshape(n, hkv, group, dim).permute(1, 0, 2, 3).reshape(hkv, n * group, dim)
    best = total = acc = None
    for p0 in range(0, -(-end // page), per):
        lo = p0 * page
        m = min(end - lo, per * page)  # keys in this block
        np_ = -(-m // page)
        idx = pages[p0:p0 + np_]
        for pool, dst in ((k_pool, k32), (v_pool, v32)):
            torch.index_select(pool, 0, idx, out=gather[:np_])
            dst[:, :np_ * page].view(hkv, np_, page, dim).copy_(gather[:np_].transpose(0, 1))
        k, v = k32[:, :m], v32[:, :m]
        scores = torch.bmm(grouped, k.transpose(1, 2)) * scale  # [Hkv, n*group, m]
        if positions is not None and n > 1:
            hidden = torch.arange(lo, lo + m, device=q.device)[None, :] > positions[:, None]  # [n, m]
            scores = scores.view(hkv, n, group, m).masked_fill(hidden[None, :, None, :], float("-inf")).view(
                hkv, n * group, m)
        if m == end:  # one block: a plain softmax
            acc, total = torch.bmm(torch.softmax(scores, dim=-1), v), 1.0
            break
        # token 0, in the first block, is visible to every row: `best` is finite from there on
        top = scores.amax(-1, keepdim=True) if best is None else torch.maximum(best, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores - top)
        if best is None:
            total, acc = weights.sum(-1, keepdim=True), torch.bmm(weights, v)
        else:
            rescale = torch.exp(best - top)
            total = total * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(weights, v)
        best = top
    out = acc / total  # [Hkv, n*group, D]
    return out.view(hkv, n, group, dim).permute(1, 0, 2, 3).reshape(n, hq, dim)


def decode_tiles(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor,
                 scale: float) -> Tensor:
    """paged_attention_decode for the whole batch at once in fixed-width tiles with an online softmax; reads no
    value on the host (module docstring)."""
    page, group = check_pools(k_pool, v_pool, q)
    batch, hq, dim = q.shape
    hkv = k_pool.shape[1]
    qf = q.float().view(batch, hkv, group, dim) * scale
    pages_per_tile = max(1, TILE_TOKENS // page)
    # Every tile is pages_per_tile wide (the table padded with the null page, masked), so a sequence's result
    # does not depend on the batch it runs in: its tiles start at the same positions and have the same width
    # whatever the longest context beside it, and a tile past its context leaves its running sums bit for bit
    # (weights 0, rescale 1). The single-tile path below gives the loop's first tile exactly.
    width = -(-block_tables.shape[1] // pages_per_tile) * pages_per_tile
    if width != block_tables.shape[1]:
        block_tables = F.pad(block_tables, (0, width - block_tables.shape[1]))
    hidden = (torch.arange(width * page, device=q.device)[None, :]
              >= context_lens[:, None])[:, None, None, :]  # [B, 1, 1, W*P]: positions past each context
    if width == pages_per_tile:  # one tile: the loop below once, without its running state
        scores, values = _tile(qf, k_pool, v_pool, block_tables, hidden)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))  # a real token is always visible: no -inf max
        return ((weights @ values) / weights.sum(-1, keepdim=True)).to(q.dtype).view(batch, hq, dim)
    best = torch.full((batch, hkv, group, 1), float("-inf"), device=q.device)
    total = torch.zeros(batch, hkv, group, 1, device=q.device)
    acc = torch.zeros(batch, hkv, group, dim, device=q.device)
    tile = pages_per_tile * page
    for w0 in range(0, width, pages_per_tile):
        scores, values = _tile(qf, k_pool, v_pool, block_tables[:, w0:w0 + pages_per_tile],
                               hidden[..., w0 * page:w0 * page + tile])
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(new_best), torch.zeros_like(new_best), new_best)  # no -inf - -inf
        weights = torch.exp(scores - safe)
        rescale = torch.exp(best - safe)
        total = total * rescale + weights.sum(-1, keepdim=True)
        acc = acc * rescale + weights @ values
        best = new_best
    return (acc / total).to(q.dtype).view(batch, hq, dim)


def _tile(qf: Tensor, k_pool: Tensor, v_pool: Tensor, pages: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Scores [B, Hkv, group, L] (fp32, -inf where `hidden` [B, 1, 1, L]) and values [B, Hkv, L, D] (fp32) of
    the pages [B, n]."""
    keys, values = (_gather_fp32(pool, pages) for pool in (k_pool, v_pool))
    scores = qf @ keys.transpose(2, 3)  # [B, Hkv, group, L]
    return scores.masked_fill(hidden, float("-inf")), values


def _gather_fp32(pool: Tensor, pages: Tensor) -> Tensor:
    """pool [N, Hkv, P, D], pages [B, n] -> fp32 [B, Hkv, n*P, D]: the pool read once into a gathered copy and once
    more into fp32 in this order (a keys' transpose is then a view the matmul reads in place)."""
    batch, n = pages.shape
    _, hkv, page, dim = pool.shape
    gathered = pool.index_select(0, pages.reshape(-1)).view(batch, n, hkv, page, dim)
    out = torch.empty(batch, hkv, n, page, dim, dtype=torch.float32, device=pool.device)
    return out.copy_(gathered.transpose(1, 2)).view(batch, hkv, n * page, dim)
