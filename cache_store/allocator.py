"""Ranges inside shared-memory segments: best-fit placement with coalescing free lists. Pure bookkeeping.

Segments are few and large (or one per entry in exact mode) and are kept mapped by writers and readers, so a
hand-off costs one copy and no page faults; the allocator only decides where in them each entry lives.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

ALIGN = 4096  # ranges start on page boundaries (DMA-friendly, and every dtype is aligned)


@dataclass(slots=True, frozen=True)
class Extent:
    segment: str
    offset: int
    length: int  # rounded up to ALIGN


@dataclass(slots=True)
class _Segment:
    size: int
    free: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), sorted, coalesced
    used: int = 0


class SegmentAllocator:
    def __init__(self, align: int = ALIGN):
        self.align = align
        self._segments: dict[str, _Segment] = {}

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.used for s in self._segments.values())

    def segment_names(self) -> list[str]:
        return list(self._segments)

    def rounded(self, size: int) -> int:
        return max(self.align, (size + self.align - 1) // self.align * self.align)

    def add_segment(self, name: str, size: int) -> None:
        if name in self._segments or size <= 0 or size % self.align:
            raise ValueError(f"bad segment {name!r} of {size} bytes")
        self._segments[name] = _Segment(size, [(0, size)])

    def remove_segment(self, name: str) -> None:
        if self._segments[name].used:
            raise ValueError(f"segment {name} still holds {self._segments[name].used} bytes")
        del self._segments[name]

    def empty_segments(self) -> list[str]:
        return [name for name, s in self._segments.items() if s.used == 0]

    def is_empty(self, name: str) -> bool:
        return self._segments[name].used == 0

    def place(self, size: int) -> Extent | None:
        """The smallest free hole that fits `size` (rounded up), or None."""
        need = self.rounded(size)
        best: tuple[int, str, int] | None = None  # (hole length, segment, index in its free list)
        for name, seg in self._segments.items():
            for i, (_, length) in enumerate(seg.free):
                if length >= need and (best is None or length < best[0]):
                    best = (length, name, i)
        if best is None:
            return None
        _, name, i = best
        seg = self._segments[name]
        offset, length = seg.free[i]
        if length == need:
            del seg.free[i]
        else:
            seg.free[i] = (offset + need, length - need)
        seg.used += need
        return Extent(name, offset, need)

    def free(self, extent: Extent) -> None:
        seg = self._segments[extent.segment]
        i = bisect.bisect_left(seg.free, (extent.offset, 0))
        start, end = extent.offset, extent.offset + extent.length
        if i > 0 and seg.free[i - 1][0] + seg.free[i - 1][1] > start or i < len(seg.free) and seg.free[i][0] < end:
            raise ValueError(f"double free of {extent}")
        if i < len(seg.free) and seg.free[i][0] == end:  # merge with the next hole
            end += seg.free.pop(i)[1]
        if i > 0 and seg.free[i - 1][0] + seg.free[i - 1][1] == start:  # and with the previous one
            start = seg.free.pop(i - 1)[0]
            i -= 1
        seg.free.insert(i, (start, end - start))
        seg.used -= extent.length
