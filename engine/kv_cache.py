"""The paged KV cache: one pool of fixed-size pages per attention layer, on the engine's device.

Pools are [num_pages, Hkv, page_size, D] (see kernels/paged_attention). A sequence owns a list of pages (its block
table, `SequenceKV`); token j lives in page pages[j // P] at offset j % P. The page size divides the prefix-cache
block size, so a cached block [Hkv, 256, D] is a whole number of pages and is copied in page by page.

With the MTP head (speculative decoding, engine/mtp.py) the cache holds the head's layers too, after the
attention layers' (`draft_layers`): a page holds every layer's K and V of its tokens, the head's included, so the
head's KV of a position sits at the model's slot of it, needs no block table of its own and comes out of the
same budget (a tensor-parallel follower, which runs no head, counts the head's bytes in a page but holds no
pools for them: every rank has the same number of pages).

Sized by `--kv-cache-bytes`: a number of bytes, or a fraction of the memory free on the device once the weights
are loaded (`KVCacheSize`); fixed, and a sequence that does not fit raises OutOfPages. Without a size the cache
grows by doubling when it runs out (eager use: tests, `generate`); compiled graphs need a fixed size.
"""

from __future__ import annotations

import weakref

import torch

from qwenpd.engine.pages import NULL_PAGE, OutOfPages, PageAllocator, pages_for
from qwenpd.engine.config import ModelConfig
from qwenpd.engine.device import free_memory
from qwenpd.engine.engine_config import DEFAULT_PAGE_SIZE, KVCacheSize, check_kv_cache_size

_GROWABLE_START_PAGES = 16


def resolve_kv_cache_bytes(size: KVCacheSize | None, device: torch.device) -> int | None:
    """Bytes of a KV cache of `size` on `device`: bytes as given, a fraction of what is free there now (call it
    once the weights are loaded), None for a cache that grows on demand."""
    check_kv_cache_size(size)
    if isinstance(size, float):
        return int(size * free_memory(device))
    return size


def kv_cache_bytes_for(engine_config, tokens: int) -> int:
    """Bytes of a KV cache that holds one sequence of `tokens` tokens for the engine `engine_config` describes (its
    pages, the null page, and one page of slack), for a fixed-size cache sized to one known request."""
    from qwenpd.engine.engine import DTYPES

    config = ModelConfig.from_pretrained(engine_config.model_dir)
    dtype = DTYPES[config.torch_dtype if engine_config.dtype == "auto" else engine_config.dtype]
    page = engine_config.pages
    return (pages_for(tokens, page) + 2) * page_bytes(config, page, dtype, draft_layers(engine_config, config))


def draft_layers(engine_config, config: ModelConfig) -> int:
    """Layers of the MTP head the cache holds for an engine made with `engine_config` (none without speculative
    decoding)."""
    return config.mtp_num_hidden_layers if engine_config.speculative else 0


def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype, draft_layers: int = 0,
               draft_kv_heads: int | None = None) -> int:
    """Bytes of one page across every attention layer and `draft_layers` layers of the MTP head (K and V), those of
    `draft_kv_heads` KV heads (default: config's; a tensor-parallel rank's config has its share of the model's
    heads, the head runs whole on the leader)."""
    per_head = 2 * config.head_dim * torch.empty((), dtype=dtype).element_size() * page_size
    heads = config.num_key_value_heads
    return (len(config.attention_layers) * heads + draft_layers * (draft_kv_heads or heads)) * per_head


class PagedKVCache:
    """Pools k[j], v[j] of attention layer number j (config.attention_layers order), then of the MTP head's layer
    l at j = draft_first + l (module doc)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, page_size: int = DEFAULT_PAGE_SIZE,
                 num_bytes: int | None = None, draft_layers: int = 0, draft_kv_heads: int | None = None,
                 draft_pools: bool = True):
        """`draft_layers`: the MTP head's, of `draft_kv_heads` KV heads (page_bytes), counted in every page; their
        pools are held only with `draft_pools` (not on a tensor-parallel follower)."""
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.config, self.dtype, self.device, self.page_size = config, dtype, torch.device(device), page_size
        self.draft_layers, self.draft_kv_heads = draft_layers, draft_kv_heads or config.num_key_value_heads
        self.growable = num_bytes is None
        if num_bytes is None:
            num_pages = _GROWABLE_START_PAGES
        else:
            num_pages = num_bytes // max(1, page_bytes(config, page_size, dtype, draft_layers, draft_kv_heads))
            if num_pages < 2:
                raise ValueError(f"kv cache of {num_bytes} bytes holds {num_pages} pages of {page_size} tokens; "
                                 "at least 2 are needed")
        self.allocator = PageAllocator(num_pages)
        shape = (num_pages, config.num_key_value_heads, page_size, config.head_dim)
        self.draft_first = len(config.attention_layers)
        shapes = [shape] * self.draft_first + [(num_pages, self.draft_kv_heads, page_size, config.head_dim)] * (
            draft_layers if draft_pools else 0)
        # zeros, not empty: padded reads must see finite values (masked scores are -inf, weights 0, but 0 * NaN)
        self.k = [torch.zeros(s, dtype=dtype, device=self.device) for s in shapes]
        self.v = [torch.zeros(s, dtype=dtype, device=self.device) for s in shapes]

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_bytes(self) -> int:
        return self.num_pages * page_bytes(self.config, self.page_size, self.dtype, self.draft_layers,
                                           self.draft_kv_heads)

    def draft_index(self, layer: int) -> int:
        """The pool number (k[j], v[j]) of the MTP head's layer `layer`; ValueError where the cache holds none."""
        j = self.draft_first + layer
        if j >= len(self.k):
            raise ValueError("this KV cache holds no pools for the MTP head's layers: make the engine with "
                             "speculative=True (EngineConfig), on the rank that runs the head")
        return j

    def allocate(self, n: int) -> list[int]:
        if self.growable and n > self.allocator.free:
            self._grow(max(2 * self.num_pages, self.num_pages + n))
        return self.allocator.allocate(n)

    def _grow(self, num_pages: int) -> None:
        for pools in (self.k, self.v):
            for i, old in enumerate(pools):
                new = old.new_zeros(num_pages, *old.shape[1:])
                new[: old.shape[0]] = old
                pools[i] = new
        self.allocator.grow(num_pages)

    def sequence(self) -> "SequenceKV":
        return SequenceKV(self)


class SequenceKV:
    """One sequence's pages (its block table). Pages return to the cache on `release()` or when this object is
    garbage collected."""

    __slots__ = ("cache", "pages", "_finalizer", "_held", "__weakref__")

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.pages: list[int] = []
        self._finalizer = weakref.finalize(self, cache.allocator.release, self.pages)
        self._held: torch.Tensor | None = None  # page_tensor's, while `pages` is as long as it

    def page_tensor(self) -> torch.Tensor:
        """`pages` as an int64 tensor on the cache's device (made again only when pages were added or released:
        the list is only ever extended or cleared)."""
        held = self._held
        if held is None or held.shape[0] != len(self.pages):
            held = self._held = torch.tensor(self.pages, dtype=torch.long, device=self.cache.device)
        return held

    def reserve(self, num_tokens: int) -> None:
        """Own enough pages for `num_tokens` tokens in total."""
        need = pages_for(num_tokens, self.cache.page_size) - len(self.pages)
        if need > 0:
            self.pages.extend(self.cache.allocate(need))

    def release(self) -> None:
        self._finalizer()  # once: a later call or garbage collection does nothing
        self.pages.clear()
        self._held = None

    def slots(self, lo: int, hi: int) -> list[int]:
        """Flat pool slots of tokens [lo, hi)."""
        p, pages = self.cache.page_size, self.pages
        return [pages[j // p] * p + j % p for j in range(lo, hi)]

    def table(self, width: int | None = None) -> list[int]:
        """The block table padded with the null page to `width` entries."""
        width = len(self.pages) if width is None else width
        if width < len(self.pages):
            raise ValueError(f"block table of {len(self.pages)} pages does not fit width {width}")
        return self.pages + [NULL_PAGE] * (width - len(self.pages))

    def read(self, j: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of tokens [lo, hi) of pool number j (an attention layer's, or the MTP head's at draft_first + l):
        contiguous [Hkv, hi-lo, D] copies."""
        p = self.cache.page_size
        idx = torch.tensor(self.pages[lo // p: pages_for(hi, p)], dtype=torch.long, device=self.cache.device)
        out = []
        for pool in (self.cache.k[j], self.cache.v[j]):
            gathered = pool[idx].transpose(0, 1).flatten(1, 2)  # [Hkv, pages * P, D]
            out.append(gathered[:, lo % p: lo % p + hi - lo].contiguous())
        return out[0], out[1]

    def load(self, j: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens [0, T) of layer j from contiguous k, v [Hkv, T, D] (any device), page by page; pages reserved."""
        p, t = self.cache.page_size, k.shape[1]
        n = pages_for(t, p)
        if n > len(self.pages):
            raise OutOfPages(f"sequence owns {len(self.pages)} pages, {n} needed for {t} tokens")
        idx = torch.tensor(self.pages[:n], dtype=torch.long, device=self.cache.device)
        for pool, src in ((self.cache.k[j], k), (self.cache.v[j], v)):
            full = t // p
            if full:  # whole pages: [Hkv, full*P, D] -> [full, Hkv, P, D]
                pool[idx[:full]] = src[:, : full * p].unflatten(1, (full, p)).transpose(0, 1).to(pool)
            if t % p:
                pool[self.pages[full], :, : t % p] = src[:, full * p:].to(pool)
