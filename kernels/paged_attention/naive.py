"""Reference attention over a paged KV cache: gather each sequence's tokens, then explicit softmax in fp64."""

from __future__ import annotations

import torch
from torch import Tensor


def naive_paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: list[int], positions: list[int],
                          scale: float) -> Tensor:
    """One sequence, explicit loops; slow and obviously right.

    Args:
        q: [T, Hq, D] queries at absolute `positions` (T ints); query i sees keys 0..positions[i].
        k_pool, v_pool: [num_pages, Hkv, page_size, D]; Hq is a multiple of Hkv (query head h reads h // group).
        block_table: the sequence's pages in order (token j lives in page block_table[j // page_size]).
        scale: multiplies q.k.

    Returns:
        o [T, Hq, D] in float64.
    """
    page = k_pool.shape[2]
    group = q.shape[1] // k_pool.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, pos in enumerate(positions):
        idx = torch.tensor([block_table[j // page] * page + j % page for j in range(pos + 1)])
        keys = k_pool.transpose(1, 2).flatten(0, 1)[idx].double().cpu()  # [L, Hkv, D]
        values = v_pool.transpose(1, 2).flatten(0, 1)[idx].double().cpu()
        for h in range(q.shape[1]):
            scores = keys[:, h // group] @ q[i, h].double().cpu() * scale  # [L]
            out[i, h] = torch.softmax(scores, dim=0) @ values[:, h // group]
    return out
