"""Page bookkeeping of the paged KV cache: plain Python, no tensors.

Page 0 is the null page: never handed out, it absorbs the writes of padding (compiled buckets) and pads block
tables, so a padded slot never touches a real sequence's KV.
"""

from __future__ import annotations

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """The KV cache has fewer free pages than a sequence needs."""


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageAllocator:
    """Free list over pages 1 .. num_pages-1 (lowest first, so a fresh cache fills from the front)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a paged KV cache needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # a stack: pop() gives the lowest

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def usable(self) -> int:
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"KV cache has {len(self._free)} free pages of {self.usable}, {n} needed")
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def grow(self, num_pages: int) -> None:
        """Pages num_pages_before .. num_pages-1 become free (the pool tensors grew to match)."""
        if num_pages <= self.num_pages:
            return
        self._free[:0] = range(num_pages - 1, self.num_pages - 1, -1)
        self.num_pages = num_pages


class PageBudget:
    """Pages promised to admitted sequences (decode admission): a sequence is admitted only if its whole final
    length fits, so it can never run out of KV mid-generation."""

    def __init__(self, pages: int | None):
        self.pages = pages  # None = unlimited (a growable cache)
        self.reserved = 0

    def fits(self, n: int) -> bool:
        return self.pages is None or self.reserved + n <= self.pages

    def reserve(self, n: int) -> None:
        if not self.fits(n):
            raise OutOfPages(f"KV cache: {self.reserved} of {self.pages} pages promised, {n} more needed")
        self.reserved += n

    def release(self, n: int) -> None:
        self.reserved -= n


def kv_tokens(num_tokens: int, fed: int, max_tokens: int, max_context: int, drafts: int) -> int:
    """The most tokens a sequence's KV can ever hold, whose pages are promised at admission: `num_tokens` in its
    state, `fed` more before its first new token and `max_tokens` new ones, within the context; and with `drafts`
    per step (K: its MTP head drafts) the positions past those its head's drafts may write (the head's KV sits in
    the sequence's pages: engine/mtp.py MTPCache)."""
    return min(max_context, num_tokens + fed + max_tokens) + drafts
