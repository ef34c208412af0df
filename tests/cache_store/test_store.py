"""The Store core in-process: index, allocator and real segment files kept consistent."""

from __future__ import annotations

import os
import stat

import pytest

from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.cache_store.index import Kind
from qwenpd.cache_store.shm import SEGMENT_NAME_RE
from qwenpd.cache_store.store import Store
from qwenpd.errors import FailedPrecondition, ResourceExhausted
from tests.cache_store.conftest import SHM, leftover_files, segment_files

MiB = 1 << 20


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def open_store(store_id: str, clock=None, **kw) -> Store:
    store = Store(CacheStoreConfig(store_id=store_id, **kw), clock or Clock())
    store.open()
    return store


def commit(store: Store, size: int, handoff: float | None = None) -> str:
    entry = store.allocate(Kind.CHECKPOINT, size)
    store.commit(entry.entry_id, "fp", 1, {}, (), handoff)
    return entry.entry_id


def test_exact_mode_one_segment_per_entry_removed_when_freed(store_id: str) -> None:
    store = open_store(store_id, budget_bytes=4 * MiB, segment_bytes=0)
    try:
        a, b = commit(store, MiB), commit(store, MiB)
        files = segment_files(store_id)
        assert len(files) == 2
        for f in files:
            assert SEGMENT_NAME_RE.match(f.name)
            assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_size == MiB
        _, lease, _ = store.acquire(a, "fp", 10)
        store.release(lease, delete=True)  # release + delete removes a's segment
        assert len(segment_files(store_id)) == 1
        commit(store, 3 * MiB + 1)  # needs b's room too: b is evicted, its segment removed
        assert store.index.peek(b) is None and len(segment_files(store_id)) == 1
        assert store.stats().index.evictions == 1
    finally:
        store.close()
    assert leftover_files(store_id) == []


def test_pooled_mode_reuses_segments_and_places_ranges(store_id: str) -> None:
    store = open_store(store_id, budget_bytes=8 * MiB, segment_bytes=4 * MiB)
    try:
        ids = [commit(store, MiB - 100) for _ in range(6)]
        assert len(segment_files(store_id)) == 2
        extents = [store.index.peek(i).payload.extent for i in ids]
        assert len({(e.segment, e.offset) for e in extents}) == 6 and all(e.offset % 4096 == 0 for e in extents)
        for i in ids:
            store.delete(i)
        names = {f.name for f in segment_files(store_id)}
        commit(store, 2 * MiB)  # free pooled room is reused, no new segment
        assert {f.name for f in segment_files(store_id)} == names
        big = commit(store, 6 * MiB)  # larger than a pooled segment: empty segments make way for a big one
        assert store.index.peek(big) is not None and store.stats().segment_bytes <= 8 * MiB
    finally:
        store.close()
    assert leftover_files(store_id) == []


def test_everything_pinned_is_resource_exhausted(store_id: str) -> None:
    store = open_store(store_id, budget_bytes=2 * MiB, segment_bytes=0)
    try:
        commit(store, MiB, handoff=30)
        commit(store, MiB, handoff=30)
        with pytest.raises(ResourceExhausted) as e:
            store.allocate(Kind.CHECKPOINT, 4096)
        assert e.value.retry_after_s is not None
    finally:
        store.close()


def test_expired_allocation_frees_its_segment(store_id: str) -> None:
    clock = Clock()
    store = open_store(store_id, clock, budget_bytes=2 * MiB, segment_bytes=0, allocation_ttl_s=1)
    try:
        store.allocate(Kind.CHECKPOINT, MiB)
        assert len(segment_files(store_id)) == 1
        clock.now += 2
        store.sweep()
        assert segment_files(store_id) == []
    finally:
        store.close()


def test_restart_removes_orphans_and_one_id_has_one_owner(store_id: str) -> None:
    first = open_store(store_id, budget_bytes=2 * MiB, segment_bytes=0)
    commit(first, MiB)
    orphan = segment_files(store_id)[0].name
    with pytest.raises(FailedPrecondition, match="another live cache store"):
        open_store(store_id)
    first.space.files._lock_fd and os.close(first.space.files._lock_fd)  # simulate a crash: lock gone, files stay
    first.space.files._lock_fd = None
    assert (SHM / orphan).exists()
    second = Store(CacheStoreConfig(store_id=store_id))
    assert second.open() == [orphan]
    assert not (SHM / orphan).exists()
    second.close()
    assert leftover_files(store_id) == []
