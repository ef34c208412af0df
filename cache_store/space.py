"""Where the store's bytes live, behind one interface: the index decides what exists and who holds it; a
`Space` only places an entry's bytes and frees them. Two backends (`--backend`):

    shm       same host: ranges in pooled /dev/shm segments (allocator.py + shm.py); readers map them
    mooncake  across hosts: one Mooncake Store object per entry (mooncake.py); readers get them over the network

An entry's place is an `Extent(name, offset, length)`: a segment range for shm, `(object key, 0, size)` for
mooncake. Both are pure bookkeeping apart from creating/removing the segment files or objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from qwenpd.cache_store.allocator import Extent, SegmentAllocator
from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.cache_store.shm import SegmentFiles

BACKENDS = ("shm", "mooncake")


class Space(Protocol):
    def open(self) -> list[str]:
        """Take ownership; remove orphans of a previous instance with the same store id; return them."""

    def close(self) -> None:
        """Remove every byte this store holds."""

    def rounded(self, size: int) -> int:
        """Bytes the index charges for an entry of `size` bytes."""

    def place(self, need: int, evict_one: Callable[[], bool]) -> Extent:
        """A place for `need` bytes (the index has made room for them already). `evict_one` frees the least
        recently used unpinned entry (False when there is none) where the backend is fragmented."""

    def free(self, extent: Extent) -> None: ...

    @property
    def total_bytes(self) -> int: ...

    @property
    def segments(self) -> int: ...


class ShmSpace:
    """Ranges in shared-memory segments: best-fit in pooled segments, or one segment per entry."""

    def __init__(self, config: CacheStoreConfig):
        self.config = config
        self.alloc = SegmentAllocator()
        self.files = SegmentFiles(config.shm_dir, config.store_id)

    def open(self) -> list[str]:
        return self.files.open()

    def close(self) -> None:
        self.files.close()

    def rounded(self, size: int) -> int:
        return self.alloc.rounded(size)

    @property
    def total_bytes(self) -> int:
        return self.alloc.total_bytes

    @property
    def segments(self) -> int:
        return len(self.alloc.segment_names())

    def place(self, need: int, evict_one: Callable[[], bool]) -> Extent:
        """A free hole, else a new segment, else drop an empty segment or evict, and retry."""
        budget = self.config.budget_bytes
        while True:
            extent = self.alloc.place(need)
            if extent is not None:
                return extent
            pooled = self.config.segment_bytes
            size = max(need, min(pooled, budget - self.alloc.total_bytes)) if pooled else need
            if self.alloc.total_bytes + size <= budget:
                self.alloc.add_segment(self.files.create(size), size)
                continue
            empty = self.alloc.empty_segments()
            if empty:
                self._remove_segment(empty[0])
                continue
            evict_one()  # fragmentation: free more than the byte count says (raises when nothing is left)

    def free(self, extent: Extent) -> None:
        self.alloc.free(extent)
        if not self.config.segment_bytes and self.alloc.is_empty(extent.segment):
            self._remove_segment(extent.segment)

    def _remove_segment(self, name: str) -> None:
        self.alloc.remove_segment(name)
        self.files.remove(name)


def make_space(config: CacheStoreConfig) -> Space:
    if config.backend == "mooncake":
        from qwenpd.cache_store.mooncake import MooncakeSpace
        return MooncakeSpace(config)
    return ShmSpace(config)
