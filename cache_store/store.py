"""The cache store's core: the index (what exists, who holds it) and the space where its bytes live (shm
segments or Mooncake Store objects, space.py), kept consistent. Synchronous and gRPC-free; the servicer wraps it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from qwenpd.cache_store.allocator import Extent
from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.cache_store.index import Entry, Index, IndexStats, Kind
from qwenpd.cache_store.space import Space, make_space
from qwenpd.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Placement:
    """An entry's payload in the index: where its bytes are and what the writer said about them."""

    extent: Extent
    size: int  # bytes the writer asked for (extent.length is rounded up)
    fingerprint: str = ""
    num_tokens: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    prefix_key: str = ""  # shared prefix-cache entries only: their key in Store.prefix


@dataclass(slots=True)
class PrefixLookup:
    """A usable cached prefix: `blocks` leading blocks with a snapshot after the last (0 = miss), the leading
    KV block entries present (possibly more than `blocks`), the snapshot entry, and leases pinning them."""

    blocks: int
    num_tokens: int
    kv_blocks: list[Entry]
    snapshot: Entry | None
    lease_ids: list[str]


@dataclass(slots=True)
class PrefixCounters:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0


@dataclass(slots=True)
class StoreStats:
    index: IndexStats
    segment_bytes: int
    segments: int
    prefix: PrefixCounters


class Store:
    def __init__(self, config: CacheStoreConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.index = Index(config.budget_bytes, clock)
        self.space: Space = make_space(config)
        # prefix cache: "<kind>:<key>" -> entry id of a committed shared entry
        self.prefix: dict[str, str] = {}
        self.prefix_counters = PrefixCounters()

    def open(self) -> list[str]:
        """Own the store id and remove orphaned segments of a previous instance; return their names."""
        orphans = self.space.open()
        if orphans:
            log.warning("removed %d orphaned segments/objects of store %r", len(orphans), self.config.store_id)
        return orphans

    def close(self) -> None:
        """Remove every segment or object (shm readers' existing mappings stay valid until they unmap)."""
        self.space.close()

    # ---- writing -----------------------------------------------------------------------------------------
    def allocate(self, kind: Kind, size: int) -> Entry:
        need = self.space.rounded(size)
        self._free(self.index.sweep())
        self._free(self.index.make_room(need, size))
        extent = self._place(need, size)
        entry, freed = self.index.allocate(kind, need, self.config.allocation_ttl_s, Placement(extent, size))
        self._free(freed)
        return entry

    def commit(self, entry_id: str, fingerprint: str, num_tokens: int, metadata: Mapping[str, str],
               refs: Iterable[str] = (), handoff_ttl_s: float | None = None) -> tuple[Entry, str | None]:
        entry = self.index.peek(entry_id)
        if entry is not None and not entry.committed:
            p: Placement = entry.payload
            p.fingerprint, p.num_tokens, p.metadata = fingerprint, num_tokens, dict(metadata)
        return self.index.commit(entry_id, refs, handoff_ttl_s)

    def abort(self, entry_id: str) -> None:
        self._free(self.index.abort(entry_id))

    def allocate_many(self, requests: list[tuple[Kind, int]]) -> list[Entry]:
        """Allocate several entries; on failure none stays allocated."""
        done: list[Entry] = []
        try:
            for kind, size in requests:
                done.append(self.allocate(kind, size))
        except BaseException:
            for entry in done:
                self.abort(entry.entry_id)
            raise
        return done

    # ---- prefix cache ------------------------------------------------------------------------------------
    def commit_shared(self, entry_id: str, kind: Kind, prefix_key: str, fingerprint: str, num_tokens: int) -> str:
        """Publish an allocation as a shared entry under its key; if the key is taken, drop the allocation and
        return the id already serving it."""
        slot = f"{kind.value}:{prefix_key}"
        existing = self.prefix.get(slot)
        if existing is not None and self.index.peek(existing) is not None:
            self.abort(entry_id)
            return existing
        entry, _ = self.commit(entry_id, fingerprint, num_tokens, {}, (), None)
        entry.payload.prefix_key = slot
        self.prefix[slot] = entry.entry_id
        return entry.entry_id

    def lease(self, entry_id: str, ttl_s: float) -> str:
        """Lease any committed entry (no fingerprint check: for shared entries the caller just wrote)."""
        _, lease_id, freed = self.index.acquire(entry_id, ttl_s)
        self._free(freed)
        return lease_id

    def lookup(self, fingerprint: str, block_keys: list[str], ttl_s: float) -> PrefixLookup:
        """Longest prefix whose KV blocks all exist and that ends in a snapshot; leases every entry returned."""
        self.sweep()
        kv: list[Entry] = []
        usable, snapshot = 0, None
        for i, key in enumerate(block_keys):
            entry = self._shared(Kind.KV_BLOCK, key, fingerprint)
            if entry is None:
                break
            kv.append(entry)
            snap = self._shared(Kind.SNAPSHOT, key, fingerprint)
            if snap is not None:
                usable, snapshot = i + 1, snap
        pinned = kv + ([snapshot] if snapshot is not None else [])
        lease_ids = [self.lease(e.entry_id, ttl_s) for e in pinned]
        c = self.prefix_counters
        if snapshot is None:
            c.misses += 1
            return PrefixLookup(0, 0, kv, None, lease_ids)
        c.hits += 1
        c.hit_tokens += snapshot.payload.num_tokens
        return PrefixLookup(usable, snapshot.payload.num_tokens, kv, snapshot, lease_ids)

    def _shared(self, kind: Kind, key: str, fingerprint: str) -> Entry | None:
        entry_id = self.prefix.get(f"{kind.value}:{key}")
        entry = self.index.peek(entry_id) if entry_id is not None else None
        if entry is None or not entry.committed or entry.payload.fingerprint != fingerprint:
            return None
        return entry

    def release_many(self, lease_ids: Iterable[str]) -> None:
        """End leases; ones already gone (expired, released) are skipped."""
        for lease_id in lease_ids:
            try:
                self.release(lease_id)
            except NotFound:
                pass

    # ---- reading -----------------------------------------------------------------------------------------
    def acquire(self, entry_id: str, expected_fingerprint: str | None, ttl_s: float) -> tuple[Entry, str, list[Entry]]:
        """Lease an entry; returns it, the lease id and its manifest (referenced entries first, itself last)."""
        entry = self.index.peek(entry_id)
        if entry is not None and entry.committed and expected_fingerprint is not None \
                and entry.payload.fingerprint != expected_fingerprint:
            raise FailedPrecondition(f"checkpoint {entry_id} was written for model {entry.payload.fingerprint[:16]}, "
                                     f"not {expected_fingerprint[:16]}", subject="fingerprint", reason="MODEL_MISMATCH")
        entry, lease_id, freed = self.index.acquire(entry_id, ttl_s)
        self._free(freed)
        return entry, lease_id, [*(self.index.get(ref) for ref in entry.refs), entry]

    def release(self, lease_id: str, delete: bool = False) -> None:
        self._free(self.index.release(lease_id, delete))

    def delete(self, entry_id: str) -> None:
        """Drop an entry. A shared entry also leaves the prefix map at once, even while checkpoints still
        reference it (they keep its bytes): lookups and new writers no longer find it (e.g. bytes gone)."""
        entry = self.index.peek(entry_id)
        if entry is not None and entry.committed:
            key = entry.payload.prefix_key
            if key and self.prefix.get(key) == entry_id:
                del self.prefix[key]
        self._free(self.index.delete(entry_id))

    def sweep(self) -> None:
        self._free(self.index.sweep())

    def stats(self) -> StoreStats:
        return StoreStats(self.index.stats(), self.space.total_bytes, self.space.segments,
                          self.prefix_counters)

    # ---- space -------------------------------------------------------------------------------------------
    def _place(self, need: int, asked: int) -> Extent:
        return self.space.place(need, lambda: self._evict_one(need, asked))

    def _evict_one(self, need: int, asked: int) -> bool:
        victim = self.index.evict_one()
        if victim is None:
            raise self.index.exhausted(need, asked)
        self._free([victim])
        return True

    def _free(self, entries: list[Entry]) -> None:
        for entry in entries:
            key = entry.payload.prefix_key
            if key and self.prefix.get(key) == entry.entry_id:
                del self.prefix[key]
            self.space.free(entry.payload.extent)
