"""Index and allocator bookkeeping: pure Python, a fake clock, no sleeping."""

from __future__ import annotations

import itertools

import pytest

from qwenpd.cache_store.allocator import Extent, SegmentAllocator
from qwenpd.cache_store.index import Index, Kind
from qwenpd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(clock: Clock) -> Index:
    counter = itertools.count()
    return Index(100, clock, new_id=lambda: f"id{next(counter)}")


def put(index: Index, size: int, refs=(), handoff: float | None = None) -> str:
    entry, _ = index.allocate(Kind.CHECKPOINT, size, ttl_s=10)
    index.commit(entry.entry_id, refs, handoff)
    return entry.entry_id


def ids(entries) -> list[str]:
    return [e.entry_id for e in entries]


def test_lru_eviction_order_follows_use(index: Index) -> None:
    a, b, c = put(index, 30), put(index, 30), put(index, 30)
    _, lease, _ = index.acquire(a, ttl_s=5)  # a becomes most recently used
    index.release(lease)
    entry, evicted = index.allocate(Kind.CHECKPOINT, 30, ttl_s=10)
    assert ids(evicted) == [b]
    _, evicted = index.allocate(Kind.CHECKPOINT, 30, ttl_s=10)
    assert ids(evicted) == [c]
    assert index.used_bytes == 90
    s = index.stats()
    assert (s.evictions, s.evicted_bytes, s.entries, s.allocations) == (2, 60, 1, 2)


def test_budget_is_never_exceeded_and_oversize_is_refused(index: Index) -> None:
    for _ in range(20):
        put(index, 33)
        assert index.used_bytes <= index.budget_bytes
    with pytest.raises(ResourceExhausted) as e:
        index.allocate(Kind.CHECKPOINT, 101, ttl_s=1)
    assert e.value.reason == "LARGER_THAN_BUDGET" and e.value.retry_after_s is None
    with pytest.raises(InvalidArgument):
        index.allocate(Kind.CHECKPOINT, 0, ttl_s=1)


def test_pinned_entries_are_not_evicted_and_full_pins_exhaust(index: Index) -> None:
    leased = put(index, 40)
    index.acquire(leased, ttl_s=60)
    writing, _ = index.allocate(Kind.CHECKPOINT, 40, ttl_s=60)  # uncommitted: pinned too
    free = put(index, 20)
    _, evicted = index.allocate(Kind.CHECKPOINT, 20, ttl_s=60)
    assert ids(evicted) == [free]
    with pytest.raises(ResourceExhausted) as e:
        index.allocate(Kind.CHECKPOINT, 10, ttl_s=1)
    assert e.value.reason == "CACHE_FULL" and e.value.retry_after_s is not None
    assert index.stats().pinned_bytes == 100
    assert index.peek(leased) is not None and index.peek(writing.entry_id) is not None


def test_lease_expiry_unpins(index: Index, clock: Clock) -> None:
    a = put(index, 60)
    _, lease, _ = index.acquire(a, ttl_s=5)
    with pytest.raises(ResourceExhausted):
        index.allocate(Kind.CHECKPOINT, 60, ttl_s=1)
    clock.now += 5.01
    _, evicted = index.allocate(Kind.CHECKPOINT, 60, ttl_s=1)
    assert ids(evicted) == [a]
    assert index.stats().expired_leases == 1
    with pytest.raises(NotFound):
        index.release(lease)


def test_handoff_pin_lasts_until_first_acquire_or_ttl(index: Index, clock: Clock) -> None:
    a = put(index, 50, handoff=30)
    b = put(index, 50, handoff=30)
    assert index.stats().leases == 2
    with pytest.raises(ResourceExhausted):
        index.allocate(Kind.CHECKPOINT, 10, ttl_s=1)
    _, lease, _ = index.acquire(a, ttl_s=5)  # the reader's lease replaces a's hand-off pin
    assert index.stats().leases == 2
    index.release(lease)
    _, evicted = index.allocate(Kind.CHECKPOINT, 10, ttl_s=1)
    assert ids(evicted) == [a]
    clock.now += 31  # b's pin expires unclaimed; b stays cached but evictable
    index.sweep()
    assert index.peek(b) is not None and not index.peek(b).pinned


def test_uncommitted_allocations_expire(index: Index, clock: Clock) -> None:
    entry, _ = index.allocate(Kind.CHECKPOINT, 70, ttl_s=2)
    clock.now += 2.5
    freed = index.sweep()
    assert ids(freed) == [entry.entry_id] and index.used_bytes == 0
    assert index.stats().expired_allocations == 1
    with pytest.raises(NotFound):
        index.commit(entry.entry_id)


def test_abort_and_double_commit(index: Index) -> None:
    entry, _ = index.allocate(Kind.CHECKPOINT, 10, ttl_s=2)
    assert ids(index.abort(entry.entry_id)) == [entry.entry_id]
    with pytest.raises(NotFound):
        index.abort(entry.entry_id)
    a = put(index, 10)
    with pytest.raises(NotFound):
        index.commit(a)


def test_delete_while_leased_frees_on_release(index: Index) -> None:
    a = put(index, 40)
    _, lease, _ = index.acquire(a, ttl_s=5)
    assert index.delete(a) == []
    with pytest.raises(NotFound):
        index.acquire(a, ttl_s=5)
    assert index.used_bytes == 40
    assert ids(index.release(lease)) == [a]
    assert index.used_bytes == 0


def test_release_with_delete_waits_for_other_leases(index: Index) -> None:
    a = put(index, 40)
    _, l1, _ = index.acquire(a, ttl_s=5)
    _, l2, _ = index.acquire(a, ttl_s=5)
    assert index.release(l1, delete=True) == []
    assert ids(index.release(l2)) == [a]


def test_references_keep_shared_entries_alive(index: Index) -> None:
    block = put(index, 30)
    ckpt = put(index, 30, refs=[block])
    assert index.peek(block).refcount == 1
    with pytest.raises(FailedPrecondition):
        index.delete(block)
    _, evicted = index.allocate(Kind.CHECKPOINT, 60, ttl_s=1)  # needs 20 more: evicts the checkpoint only
    assert ids(evicted) == [ckpt]
    assert index.peek(block).refcount == 0
    _, evicted = index.allocate(Kind.CHECKPOINT, 30, ttl_s=1)
    assert ids(evicted) == [block]
    with pytest.raises(NotFound):
        put(index, 1, refs=["nope"])


def test_acquire_counts_hits_and_misses(index: Index) -> None:
    a = put(index, 10)
    index.acquire(a, ttl_s=1)
    with pytest.raises(NotFound):
        index.acquire("missing", ttl_s=1)
    s = index.stats()
    assert (s.acquire_hits, s.acquire_misses, s.by_kind[Kind.CHECKPOINT]) == (1, 1, (1, 10))


# ---- allocator ------------------------------------------------------------------------------------------------
def test_allocator_best_fit_and_coalescing() -> None:
    al = SegmentAllocator(align=16)
    al.add_segment("s", 160)
    a, b, c = al.place(16), al.place(32), al.place(16)
    assert (a.offset, b.offset, c.offset) == (0, 16, 48)
    al.free(b)
    assert al.place(48) == Extent("s", 64, 48)  # the 32-byte hole is too small
    assert al.place(20) == Extent("s", 16, 32)  # best fit takes the hole
    for e in (a, c, Extent("s", 16, 32), Extent("s", 64, 48)):
        al.free(e)
    assert al.is_empty("s") and al.place(160) == Extent("s", 0, 160)
    with pytest.raises(ValueError, match="still holds"):
        al.remove_segment("s")


def test_allocator_rejects_double_free_and_reports_no_room() -> None:
    al = SegmentAllocator(align=16)
    al.add_segment("s", 32)
    e = al.place(32)
    assert al.place(1) is None
    al.free(e)
    with pytest.raises(ValueError, match="double free"):
        al.free(e)
    al.remove_segment("s")
    assert al.total_bytes == 0
