"""The cache store's bookkeeping: entries, refcounts, leases with TTL, LRU eviction under a byte budget.

Pure Python, no tensors, no I/O: time comes from an injected clock, and operations return the entries whose
bytes may now be freed, for the caller to free. An entry is pinned (never evicted) while it is being written,
leased, or referenced by another live entry; LRU eviction picks among the rest.

Entries of every kind share this index. A checkpoint built on shared entries (the prefix cache's KV blocks
and DeltaNet snapshots) lists them in `refs` at commit: each referenced entry's refcount holds it alive until
the checkpoint is gone, then it becomes an ordinary LRU candidate again.
"""

from __future__ import annotations

import enum
import heapq
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qwenpd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


class Kind(enum.Enum):
    CHECKPOINT = "checkpoint"
    KV_BLOCK = "kv_block"
    SNAPSHOT = "snapshot"


@dataclass(slots=True, eq=False)
class Entry:
    entry_id: str
    kind: Kind
    size: int
    committed: bool = False
    deadline: float | None = None  # uncommitted: freed after this
    refs: tuple[str, ...] = ()  # entries this one keeps alive
    refcount: int = 0  # live entries referencing this one
    leases: set[str] = field(default_factory=set)
    deleted: bool = False  # out of the namespace; bytes freed when the last lease ends
    payload: Any = None  # the owner's data (segment range, metadata); never read here

    @property
    def pinned(self) -> bool:
        return not self.committed or bool(self.leases) or self.refcount > 0


@dataclass(slots=True)
class _Lease:
    lease_id: str
    entry_id: str
    expires_at: float
    handoff: bool  # the pin a commit puts on a checkpoint until its reader's first acquire


@dataclass(slots=True)
class IndexStats:
    budget_bytes: int
    used_bytes: int
    pinned_bytes: int
    entries: int
    leases: int
    allocations: int
    evictions: int
    evicted_bytes: int
    expired_leases: int
    expired_allocations: int
    acquire_hits: int
    acquire_misses: int
    by_kind: dict[Kind, tuple[int, int]]  # kind -> (committed entries, bytes)


class Index:
    """Entries by id in LRU order (oldest first), leases by id, expiries in a heap (lazily cleaned)."""

    def __init__(self, budget_bytes: int, clock: Callable[[], float] = time.monotonic,
                 new_id: Callable[[], str] = lambda: secrets.token_hex(16)):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._new_id = new_id
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # the namespace, LRU order
        self._doomed: dict[str, Entry] = {}  # deleted but still leased
        self._leases: dict[str, _Lease] = {}
        self._expiries: list[tuple[float, int, str, str]] = []  # (time, seq, "lease"|"alloc", id)
        self._seq = 0
        self.used_bytes = 0
        self._counters = dict(evictions=0, evicted_bytes=0, expired_leases=0, expired_allocations=0,
                              acquire_hits=0, acquire_misses=0)

    # ---- writing -----------------------------------------------------------------------------------------
    def allocate(self, kind: Kind, size: int, ttl_s: float, payload: Any = None) -> tuple[Entry, list[Entry]]:
        """Add an uncommitted entry of `size` bytes, evicting LRU entries to fit the budget.

        Returns the entry and the evicted entries (free their bytes). Raises ResourceExhausted if it cannot fit.
        """
        if size <= 0:
            raise InvalidArgument("size_bytes", f"must be > 0, got {size}")
        freed = self.sweep()
        freed += self.make_room(size)
        entry = Entry(self._new_id(), kind, size, deadline=self._clock() + ttl_s, payload=payload)
        self._entries[entry.entry_id] = entry
        self.used_bytes += size
        self._expire_at(entry.deadline, "alloc", entry.entry_id)
        return entry, freed

    def make_room(self, size: int, asked: int | None = None) -> list[Entry]:
        """Evict LRU unpinned entries until `size` more bytes fit the budget; return them. `asked`: the size the
        caller asked for, where `size` is it rounded up (errors name both)."""
        if size > self.budget_bytes:
            raise ResourceExhausted(f"{_size(size, asked)} exceed the cache budget of {self.budget_bytes} bytes",
                                    subject="cache_store.budget_bytes", reason="LARGER_THAN_BUDGET")
        evicted = []
        while self.used_bytes + size > self.budget_bytes:
            victim = self.evict_one()
            if victim is None:
                raise self.exhausted(size, asked)
            evicted.append(victim)
        return evicted

    def exhausted(self, size: int, asked: int | None = None) -> ResourceExhausted:
        pinned = self.stats().pinned_bytes
        return ResourceExhausted(f"no room for {_size(size, asked)}: {pinned} of {self.budget_bytes} budget bytes "
                                 "are pinned by leases, references or writes in progress",
                                 subject="cache_store.budget_bytes", retry_after_s=0.1, reason="CACHE_FULL")

    def commit(self, entry_id: str, refs: Iterable[str] = (), handoff_ttl_s: float | None = None) -> tuple[Entry, str | None]:
        """Publish an allocation. `refs` must be committed entries; each gains a reference. With a hand-off
        TTL, the entry is pinned by a hand-off lease until its first acquire (or the TTL); returns its id."""
        self.sweep()
        entry = self._entries.get(entry_id)
        if entry is None or entry.committed:
            raise NotFound(f"allocation {entry_id} not found (never made, expired, aborted or already committed)",
                           resource_type="allocation", resource_name=entry_id)
        refs = tuple(refs)
        for ref in refs:
            target = self._entries.get(ref)
            if target is None or not target.committed or ref == entry_id:
                raise NotFound(f"referenced entry {ref} not found", resource_type="entry", resource_name=ref)
        for ref in refs:
            self._entries[ref].refcount += 1
        entry.committed, entry.deadline, entry.refs = True, None, refs
        self._entries.move_to_end(entry_id)
        lease_id = self._add_lease(entry, handoff_ttl_s, handoff=True) if handoff_ttl_s else None
        return entry, lease_id

    def abort(self, entry_id: str) -> list[Entry]:
        """Drop an uncommitted allocation; returns it for freeing."""
        self.sweep()
        entry = self._entries.get(entry_id)
        if entry is None or entry.committed:
            raise NotFound(f"allocation {entry_id} not found", resource_type="allocation", resource_name=entry_id)
        return self._remove(entry)

    # ---- reading -----------------------------------------------------------------------------------------
    def acquire(self, entry_id: str, ttl_s: float) -> tuple[Entry, str, list[Entry]]:
        """Lease a committed entry (ending its hand-off pin). Returns entry, lease id and entries freed by sweep."""
        freed = self.sweep()
        entry = self._entries.get(entry_id)
        if entry is None or not entry.committed:
            self._counters["acquire_misses"] += 1
            raise NotFound(f"checkpoint {entry_id} not found (never committed, evicted, expired or deleted)",
                           resource_type="checkpoint", resource_name=entry_id)
        self._counters["acquire_hits"] += 1
        for lease_id in [lid for lid in entry.leases if self._leases[lid].handoff]:
            self._end_lease(lease_id)
        self._entries.move_to_end(entry_id)
        return entry, self._add_lease(entry, ttl_s, handoff=False), freed

    def release(self, lease_id: str, delete: bool = False) -> list[Entry]:
        """End a lease; with `delete`, also delete its entry once no other lease holds it. Returns freed entries."""
        freed = self.sweep()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound(f"lease {lease_id} not found (never granted, released or expired)",
                           resource_type="lease", resource_name=lease_id)
        entry = self._entries.get(lease.entry_id) or self._doomed[lease.entry_id]
        freed += self._end_lease(lease_id)
        if delete and not entry.deleted and entry.refcount == 0:
            freed += self._delete(entry)
        return freed

    def delete(self, entry_id: str) -> list[Entry]:
        """Remove a committed entry from the namespace; its bytes are freed once no lease holds it."""
        freed = self.sweep()
        entry = self._entries.get(entry_id)
        if entry is None or not entry.committed:
            raise NotFound(f"checkpoint {entry_id} not found", resource_type="checkpoint", resource_name=entry_id)
        if entry.refcount:
            raise FailedPrecondition(f"entry {entry_id} is referenced by {entry.refcount} other entries",
                                     subject=entry_id, reason="ENTRY_REFERENCED")
        for lease_id in [lid for lid in entry.leases if self._leases[lid].handoff]:
            self._end_lease(lease_id)
        return freed + self._delete(entry)

    def get(self, entry_id: str) -> Entry:
        entry = self._entries.get(entry_id)
        if entry is None:
            raise NotFound(f"entry {entry_id} not found", resource_type="entry", resource_name=entry_id)
        return entry

    def peek(self, entry_id: str) -> Entry | None:
        """The entry if it is in the namespace (committed or not), without touching LRU order."""
        return self._entries.get(entry_id)

    def lease_expiry(self, lease_id: str) -> float:
        return self._leases[lease_id].expires_at

    # ---- eviction and expiry -----------------------------------------------------------------------------
    def evict_one(self) -> Entry | None:
        """Remove the least recently used unpinned committed entry; None if every entry is pinned."""
        for entry in self._entries.values():
            if not entry.pinned:
                self._counters["evictions"] += 1
                self._counters["evicted_bytes"] += entry.size
                self._remove(entry)
                return entry
        return None

    def sweep(self) -> list[Entry]:
        """Expire leases and stale allocations due by now; return entries freed as a result."""
        now, freed = self._clock(), []
        while self._expiries and self._expiries[0][0] <= now:
            _, _, what, key = heapq.heappop(self._expiries)
            if what == "lease" and key in self._leases:
                self._counters["expired_leases"] += 1
                freed += self._end_lease(key)
            elif what == "alloc":
                entry = self._entries.get(key)
                if entry is not None and not entry.committed:
                    self._counters["expired_allocations"] += 1
                    freed += self._remove(entry)
        return freed

    def next_expiry(self) -> float | None:
        return self._expiries[0][0] if self._expiries else None

    def stats(self) -> IndexStats:
        live = [*self._entries.values(), *self._doomed.values()]
        by_kind: dict[Kind, tuple[int, int]] = {}
        for e in self._entries.values():
            if e.committed:
                n, b = by_kind.get(e.kind, (0, 0))
                by_kind[e.kind] = (n + 1, b + e.size)
        return IndexStats(
            budget_bytes=self.budget_bytes, used_bytes=self.used_bytes,
            pinned_bytes=sum(e.size for e in live if e.pinned),
            entries=sum(1 for e in self._entries.values() if e.committed), leases=len(self._leases),
            allocations=sum(1 for e in self._entries.values() if not e.committed), by_kind=by_kind,
            **self._counters)

    def all_entries(self) -> list[Entry]:
        return [*self._entries.values(), *self._doomed.values()]

    # ---- internals ---------------------------------------------------------------------------------------
    def _add_lease(self, entry: Entry, ttl_s: float, handoff: bool) -> str:
        lease = _Lease(self._new_id(), entry.entry_id, self._clock() + ttl_s, handoff)
        self._leases[lease.lease_id] = lease
        entry.leases.add(lease.lease_id)
        self._expire_at(lease.expires_at, "lease", lease.lease_id)
        return lease.lease_id

    def _end_lease(self, lease_id: str) -> list[Entry]:
        lease = self._leases.pop(lease_id)
        entry = self._entries.get(lease.entry_id) or self._doomed[lease.entry_id]
        entry.leases.discard(lease_id)
        if entry.deleted and not entry.leases:
            return self._remove(entry)
        return []

    def _delete(self, entry: Entry) -> list[Entry]:
        if entry.leases:
            entry.deleted = True
            del self._entries[entry.entry_id]
            self._doomed[entry.entry_id] = entry
            return []
        return self._remove(entry)

    def _remove(self, entry: Entry) -> list[Entry]:
        """Forget an entry for good: drop its references and its bytes from the budget."""
        self._entries.pop(entry.entry_id, None)
        self._doomed.pop(entry.entry_id, None)
        for lease_id in list(entry.leases):
            self._leases.pop(lease_id, None)
        entry.leases.clear()
        for ref in entry.refs:
            target = self._entries.get(ref) or self._doomed.get(ref)
            if target is not None:
                target.refcount -= 1
        self.used_bytes -= entry.size
        return [entry]

    def _expire_at(self, when: float, what: str, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._expiries, (when, self._seq, what, key))


def _size(size: int, asked: int | None) -> str:
    """A size for a message: the bytes the caller asked for, and what the store rounded them up to if more."""
    if asked is None or asked == size:
        return f"{size} bytes"
    return f"{asked} bytes ({size} once rounded up)"
