"""Attention over a paged KV cache: a dense reference and the tiled kernels for a prefill chunk and a decode batch."""

from qwenpd.kernels.paged_attention.naive import naive_paged_attention
from qwenpd.kernels.paged_attention.paged import TILE_TOKENS, paged_attention_decode, paged_attention_prefill, write_kv

__all__ = ["TILE_TOKENS", "naive_paged_attention", "paged_attention_decode", "paged_attention_prefill", "write_kv"]
