"""The CacheStore gRPC service: protobuf in and out of the Store core, plus `serve(config)`."""

from __future__ import annotations

import asyncio
import logging
import re

from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.cache_store.index import Entry, Kind
from qwenpd.cache_store.shm import host_id
from qwenpd.cache_store.store import Placement, Store
from qwenpd.errors import InvalidArgument
from qwenpd.grpc_server import OnReady, run_server, serve_main
from qwenpd.metrics import StoreMetrics
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb
from qwenpd.protos.qwenpd.v1 import cache_store_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_KIND_TO_PB = {Kind.CHECKPOINT: pb.ENTRY_KIND_CHECKPOINT, Kind.KV_BLOCK: pb.ENTRY_KIND_KV_BLOCK,
               Kind.SNAPSHOT: pb.ENTRY_KIND_SNAPSHOT}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
_DATA_PLANE = {"shm": pb.DATA_PLANE_SHM, "mooncake": pb.DATA_PLANE_MOONCAKE}
_NS = 1_000_000_000
MAX_TTL_NS = 24 * 3600 * _NS
_HEX = re.compile(r"[0-9a-fA-F]+")


def _ttl_s(value_ns: int, field: str) -> float:
    if not 0 < value_ns <= MAX_TTL_NS:
        raise InvalidArgument(field, f"must be in (0, {MAX_TTL_NS}] ns, got {value_ns}")
    return value_ns / _NS


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return value


def _hex_key(value: str, field: str) -> str:
    if not _HEX.fullmatch(_required(value, field)):
        raise InvalidArgument(field, f"must be a hex key, got {value[:80]!r}")
    return value


def checkpoint_info(entry: Entry) -> pb.CheckpointInfo:
    p: Placement = entry.payload
    return pb.CheckpointInfo(checkpoint_id=entry.entry_id, fingerprint=p.fingerprint, num_tokens=p.num_tokens,
                             size_bytes=p.size, metadata=p.metadata)


def segment_ref(entry: Entry) -> pb.SegmentRef:
    p: Placement = entry.payload
    return pb.SegmentRef(name=p.extent.segment, offset=p.extent.offset, length=p.size)


def _part(entry: Entry) -> pb.ManifestPart:
    return pb.ManifestPart(entry_id=entry.entry_id, kind=_KIND_TO_PB[entry.kind], segment=segment_ref(entry))


def _allocation_args(request: pb.AllocateSegmentRequest, kind_field: str, size_field: str) -> tuple[Kind, int]:
    kind = _PB_TO_KIND.get(request.kind)
    if kind is None:
        raise InvalidArgument(kind_field, "must name an entry kind")
    if request.size_bytes <= 0:
        raise InvalidArgument(size_field, "must be > 0")
    return kind, request.size_bytes


class CacheStoreServicer(pb_grpc.CacheStoreServicer):
    """Every call is a few dictionary operations on the event loop; no bytes pass through here."""

    def __init__(self, store: Store):
        self.store = store
        self.config = store.config
        self._host_id = host_id()

    async def GetStoreInfo(self, request: pb.GetStoreInfoRequest, context) -> pb.StoreInfo:
        c = self.config
        return pb.StoreInfo(store_id=c.store_id, shm_dir=c.shm_dir, host_id=self._host_id,
                            budget_bytes=c.budget_bytes, lease_ttl_ns=int(c.lease_ttl_s * _NS),
                            allocation_ttl_ns=int(c.allocation_ttl_s * _NS), data_plane=_DATA_PLANE[c.backend],
                            mooncake_master=c.mooncake_master, mooncake_metadata=c.mooncake_metadata)

    async def AllocateSegment(self, request: pb.AllocateSegmentRequest, context) -> pb.Allocation:
        entry = self.store.allocate(*_allocation_args(request, "kind", "size_bytes"))
        return self._allocation(entry)

    async def AllocateSegments(self, request: pb.AllocateSegmentsRequest, context) -> pb.AllocateSegmentsResponse:
        wanted = [_allocation_args(r, f"requests[{i}].kind", f"requests[{i}].size_bytes")
                  for i, r in enumerate(request.requests)]
        return pb.AllocateSegmentsResponse(allocations=[self._allocation(e) for e in self.store.allocate_many(wanted)])

    def _allocation(self, entry: Entry) -> pb.Allocation:
        return pb.Allocation(entry_id=entry.entry_id, segment=segment_ref(entry),
                             ttl_ns=int(self.config.allocation_ttl_s * _NS))

    async def CommitShared(self, request: pb.CommitSharedRequest, context) -> pb.CommitSharedResponse:
        shared = []  # every entry checked before any is published
        for i, e in enumerate(request.entries):
            kind = _PB_TO_KIND.get(e.kind)
            if kind not in (Kind.KV_BLOCK, Kind.SNAPSHOT):
                raise InvalidArgument(f"entries[{i}].kind", "must be ENTRY_KIND_KV_BLOCK or ENTRY_KIND_SNAPSHOT")
            shared.append((_required(e.entry_id, f"entries[{i}].entry_id"), kind,
                           _hex_key(e.prefix_key, f"entries[{i}].prefix_key"),
                           _required(e.fingerprint, f"entries[{i}].fingerprint"), e.num_tokens))
        ids = [self.store.commit_shared(*args) for args in shared]
        leases = []
        if request.HasField("lease_ttl_ns"):
            ttl = _ttl_s(request.lease_ttl_ns, "lease_ttl_ns")
            leases = [self.store.lease(entry_id, ttl) for entry_id in ids]
        return pb.CommitSharedResponse(entry_ids=ids, lease_ids=leases)

    async def LookupPrefix(self, request: pb.LookupPrefixRequest, context) -> pb.PrefixHit:
        fingerprint = _required(request.fingerprint, "fingerprint")
        ttl = _ttl_s(request.ttl_ns, "ttl_ns") if request.HasField("ttl_ns") else self.config.lease_ttl_s
        hit = self.store.lookup(fingerprint, list(request.block_keys), ttl)
        out = pb.PrefixHit(blocks=hit.blocks, num_tokens=hit.num_tokens, lease_ids=hit.lease_ids,
                           kv_blocks=[_part(e) for e in hit.kv_blocks])
        if hit.snapshot is not None:
            out.snapshot.CopyFrom(_part(hit.snapshot))
        return out

    async def ReleaseLeases(self, request: pb.ReleaseLeasesRequest, context) -> pb.ReleaseLeasesResponse:
        self.store.release_many(request.lease_ids)
        return pb.ReleaseLeasesResponse()

    async def CommitCheckpoint(self, request: pb.CommitCheckpointRequest, context) -> pb.CommitCheckpointResponse:
        _required(request.entry_id, "entry_id")
        _required(request.fingerprint, "fingerprint")
        if request.HasField("handoff_ttl_ns"):
            handoff = _ttl_s(request.handoff_ttl_ns, "handoff_ttl_ns") if request.handoff_ttl_ns else None
        else:
            handoff = self.config.lease_ttl_s
        entry, lease_id = self.store.commit(request.entry_id, request.fingerprint, request.num_tokens,
                                            dict(request.metadata), request.referenced_entry_ids, handoff)
        return pb.CommitCheckpointResponse(checkpoint=checkpoint_info(entry), handoff_lease_id=lease_id or "")

    async def AbortAllocation(self, request: pb.AbortAllocationRequest, context) -> pb.AbortAllocationResponse:
        self.store.abort(_required(request.entry_id, "entry_id"))
        return pb.AbortAllocationResponse()

    async def AcquireLease(self, request: pb.AcquireLeaseRequest, context) -> pb.Lease:
        checkpoint_id = _required(request.checkpoint_id, "checkpoint_id")
        ttl = _ttl_s(request.ttl_ns, "ttl_ns") if request.HasField("ttl_ns") else self.config.lease_ttl_s
        expected = request.expected_fingerprint if request.HasField("expected_fingerprint") else None
        entry, lease_id, manifest = self.store.acquire(checkpoint_id, expected, ttl)
        parts = [_part(e) for e in manifest]
        remaining = max(0.0, self.store.index.lease_expiry(lease_id) - self.store.clock())
        return pb.Lease(lease_id=lease_id, checkpoint=checkpoint_info(entry), parts=parts, ttl_ns=int(remaining * _NS))

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context) -> pb.ReleaseLeaseResponse:
        self.store.release(_required(request.lease_id, "lease_id"), request.delete_checkpoint)
        return pb.ReleaseLeaseResponse()

    async def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, context) -> pb.DeleteCheckpointResponse:
        self.store.delete(_required(request.checkpoint_id, "checkpoint_id"))
        return pb.DeleteCheckpointResponse()

    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.StoreStats:
        s = self.store.stats()
        i = s.index
        return pb.StoreStats(
            budget_bytes=i.budget_bytes, used_bytes=i.used_bytes, pinned_bytes=i.pinned_bytes,
            segment_bytes=s.segment_bytes, segments=s.segments, entries=i.entries, leases=i.leases,
            allocations=i.allocations, evictions=i.evictions, evicted_bytes=i.evicted_bytes,
            expired_leases=i.expired_leases, expired_allocations=i.expired_allocations,
            acquire_hits=i.acquire_hits, acquire_misses=i.acquire_misses, prefix_hits=s.prefix.hits,
            prefix_misses=s.prefix.misses, prefix_hit_tokens=s.prefix.hit_tokens,
            by_kind=[pb.KindStats(kind=_KIND_TO_PB[k], entries=n, bytes=b) for k, (n, b) in i.by_kind.items()])


async def _sweep_forever(store: Store, max_interval_s: float = 1.0) -> None:
    """Free expired leases and allocations even when no call arrives."""
    while True:
        nxt = store.index.next_expiry()
        delay = max_interval_s if nxt is None else min(max_interval_s, max(0.005, nxt - store.clock()))
        await asyncio.sleep(delay)
        try:
            store.sweep()
        except Exception:  # a bug here must not silently stop expiry for the rest of the store's life
            log.exception("sweeping expired leases and allocations failed")


async def run(config: CacheStoreConfig, on_ready: OnReady | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then drain, and remove every segment."""
    store = Store(config)
    store.open()
    sweeper = asyncio.create_task(_sweep_forever(store))
    metrics = StoreMetrics(store.stats, asyncio.get_running_loop())
    try:
        await run_server(CacheStoreServicer(store), listen=config.listen, security=config.security, metrics=metrics,
                         metrics_port=config.metrics_port, grace_s=config.grace_s, on_ready=on_ready,
                         describe=f"cache store {config.store_id!r} (budget {config.budget_bytes} bytes, "
                                  f"{_where(config)})")
    finally:
        sweeper.cancel()
        metrics.close()
        store.close()


def _where(config: CacheStoreConfig) -> str:
    if config.backend == "mooncake":
        return f"mooncake master {config.mooncake_master}, metadata {config.mooncake_metadata}"
    return f"shm {config.shm_dir}"


def serve(config: CacheStoreConfig, ready_file: str | None = None) -> int:
    """Entry point of `qwenpd serve cache` and `python -m qwenpd.cache_store`: run one cache store in this process
    until SIGTERM/SIGINT (see qwenpd.grpc_server.serve_main)."""
    return serve_main("cache store", lambda on_ready: run(config, on_ready), ready_file,
                      {"store_id": config.store_id})
