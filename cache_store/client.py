"""The cache store's control-plane client: one asyncio implementation (`AsyncCacheStoreClient`) and a thin
blocking wrapper with the same calls (`CacheStoreClient`: the same coroutines over a blocking channel, so they
never suspend and run to completion on the caller's thread). The two calls the services make:

    prefill:  checkpoint_id = client.put_checkpoint(state.to_tensors(), CheckpointMeta(fp, n, {...}))
    decode:   with client.checkpoint(checkpoint_id, fp, lambda n: expected_shapes(config, n), dtypes) as ckpt:
                  state = engine.state_from_tensors(ckpt.tensors, ckpt.num_tokens)  # the one copy, page by page

put_checkpoint allocates a range, writes the checkpoint straight into it (one copy, checksummed on the way) and
commits it. get_checkpoint leases it and returns zero-copy tensor views of the mapped range, checked against
the model; they are valid only until the lease is released (`release`, or the end of the `with`). The prefix
cache adds put_shared / put_prefix_checkpoint / lookup_prefix / release_leases. The bytes move through the data
plane (`cache_store/data_plane.py`), never through these RPCs.

Data-plane work (copies, checksums) runs on the caller's thread in the blocking client (the prefill worker, so
no torch or OpenMP work lands on another thread), and in a worker thread above 1 MiB in the asyncio client.
Failures raise qwenpd.errors exceptions (NotFound, FailedPrecondition, ResourceExhausted, DataLoss, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from qwenpd.cache_store.checkpoint import CheckpointMeta, CheckpointWriter, ShapeSpec
from qwenpd.cache_store.data_plane import DataPlane, LeasedCheckpoint, open_data_plane
from qwenpd.errors import DataLoss, NotFound, QwenpdError
from qwenpd.grpc_status import from_rpc_error
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb
from qwenpd.protos.qwenpd.v1 import cache_store_pb2_grpc as pb_grpc
from qwenpd.security import Security
from qwenpd.security import channel as secure_channel

__all__ = ["AsyncCacheStoreClient", "CacheStoreClient", "LeasedCheckpoint", "PrefixRead", "SharedItem"]

DEFAULT_TIMEOUT_S = 10.0
_OFFLOAD_BYTES = 1 << 20  # asyncio client: data-plane work above this runs in a thread, off the event loop
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)]
_SHARED_PIN_S = 60.0  # how long fresh shared entries stay leased while their checkpoint is committed
T = TypeVar("T")


@dataclass(slots=True)
class SharedItem:
    """A prefix-cache entry to write: a KV block or a DeltaNet snapshot, under its prefix key."""

    kind: int  # pb.ENTRY_KIND_KV_BLOCK or pb.ENTRY_KIND_SNAPSHOT
    prefix_key: str
    tensors: Mapping[str, torch.Tensor]
    num_tokens: int


@dataclass(slots=True)
class PrefixRead:
    """A leased prefix hit. kv[i] holds block i's K/V per attention layer; snapshot the DeltaNet state after
    `blocks` blocks (None on a miss). Tensors alias shared memory: copy them before `release_leases`."""

    blocks: int
    num_tokens: int
    kv_ids: list[str]
    kv: list[dict[str, torch.Tensor]]
    snapshot: dict[str, torch.Tensor] | None
    lease_ids: list[str]


class AsyncCacheStoreClient:
    """The cache store client (asyncio). Every call has a deadline (`timeout_s`)."""

    offload_bytes: int | None = _OFFLOAD_BYTES  # data-plane work above this runs in a worker thread; None = inline

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, io_threads: int | None = None,
                 security: Security | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = self._open_channel(address, security)
        self._stub = pb_grpc.CacheStoreStub(self._channel)
        self._io_threads = io_threads
        self._info: pb.StoreInfo | None = None
        self._plane: DataPlane | None = None

    def _open_channel(self, address: str, security: Security | None) -> Any:
        return secure_channel(address, security, _CHANNEL_OPTIONS, aio=True)

    async def _close_channel(self) -> None:
        await self._channel.close()

    async def _data_work(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """Data-plane work (copies, checksums) of `nbytes` bytes: inline, or in a worker thread when large, so
        the event loop keeps serving. None = always inline (the blocking client: on its caller's thread)."""
        if self.offload_bytes is not None and nbytes > self.offload_bytes:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _call(self, method: str, request: Any) -> Any:
        try:
            reply = getattr(self._stub, method)(request, timeout=self.timeout_s)
            return await reply if inspect.isawaitable(reply) else reply  # a blocking channel answers at once
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def _abort(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            with contextlib.suppress(QwenpdError):
                await self._call("AbortAllocation", pb.AbortAllocationRequest(entry_id=entry_id))

    async def info(self) -> pb.StoreInfo:
        """The store's description (cached). FailedPrecondition if the store is on another host."""
        if self._plane is None:
            info = await self._call("GetStoreInfo", pb.GetStoreInfoRequest())
            self._plane, self._info = open_data_plane(info, self._io_threads), info
        return self._info  # type: ignore[return-value]

    async def _data_plane(self) -> DataPlane:
        if self._plane is None:
            await self.info()
        return self._plane  # type: ignore[return-value]

    async def put_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta, *,
                             handoff_ttl_s: float | None = None, refs: Sequence[str] = ()) -> str:
        """Write and commit a checkpoint; returns its id. handoff_ttl_s: how long it stays pinned for its
        reader (None = the store's lease TTL, 0 = not pinned). refs: shared KV blocks (in prefix order) that
        hold the checkpoint's leading KV; `tensors` then carry only the KV after them."""
        writer = CheckpointWriter(tensors, meta, self._io_threads)
        plane = await self._data_plane()
        alloc = await self._call("AllocateSegment", _allocate_request(writer))
        try:
            await self._data_work(writer.nbytes, plane.write, writer, alloc)
        except BaseException:
            await self._abort([alloc.entry_id])
            raise
        response = await self._call("CommitCheckpoint", _commit_request(alloc.entry_id, meta, handoff_ttl_s, refs))
        return response.checkpoint.checkpoint_id

    # ---- prefix cache --------------------------------------------------------------------------------------
    async def put_shared(self, items: Sequence[SharedItem], fingerprint: str) -> list[str]:
        """Write KV blocks / snapshots and publish them under their keys; returns the id serving each key (an
        existing entry's where another request cached the same prefix first)."""
        return (await self._put_prefix(items, fingerprint, None))[0]

    async def put_prefix_checkpoint(self, items: Sequence[SharedItem], tensors: Mapping[str, torch.Tensor],
                                    meta: CheckpointMeta, known_refs: Sequence[str], new_refs: int, *,
                                    handoff_ttl_s: float | None = None) -> str:
        """Publish a prompt's new prefix entries and its hand-off checkpoint together: all ranges are allocated
        in one call (all or nothing, so the hand-off never waits behind the request's own fresh entries), the
        shared entries are committed under leases, then the checkpoint referencing `known_refs` + the first
        `new_refs` new entries (the new KV blocks, in prefix order). Returns the checkpoint id."""
        ids, leases, ckpt = await self._put_prefix(items, meta.fingerprint, (tensors, meta))
        try:
            refs = [*known_refs, *ids[:new_refs]]
            response = await self._call("CommitCheckpoint", _commit_request(ckpt, meta, handoff_ttl_s, refs))
            return response.checkpoint.checkpoint_id
        except BaseException:
            await self._abort([ckpt])
            raise
        finally:
            await self.release_leases(leases)

    async def _put_prefix(self, items: Sequence[SharedItem], fingerprint: str,
                          own: tuple[Mapping[str, torch.Tensor], CheckpointMeta] | None
                          ) -> tuple[list[str], list[str], str]:
        plane = await self._data_plane()
        writers = [CheckpointWriter(it.tensors, CheckpointMeta(fingerprint, it.num_tokens, {}), self._io_threads)
                   for it in items]
        kinds = [it.kind for it in items]
        if own is not None:
            writers.append(CheckpointWriter(own[0], own[1], self._io_threads))
            kinds.append(pb.ENTRY_KIND_CHECKPOINT)
        if not writers:
            return [], [], ""
        allocs = list((await self._call("AllocateSegments", pb.AllocateSegmentsRequest(requests=[
            pb.AllocateSegmentRequest(size_bytes=w.nbytes, kind=k) for w, k in zip(writers, kinds)]))).allocations)
        try:
            await self._data_work(sum(w.nbytes for w in writers), plane.write_many, writers, allocs)
            entries = [pb.SharedEntry(entry_id=a.entry_id, kind=it.kind, prefix_key=it.prefix_key,
                                      fingerprint=fingerprint, num_tokens=it.num_tokens)
                       for a, it in zip(allocs, items)]
            done = pb.CommitSharedResponse()
            if entries:
                done = await self._call("CommitShared", pb.CommitSharedRequest(
                    entries=entries, lease_ttl_ns=_ns(_SHARED_PIN_S) if own is not None else None))
        except BaseException:
            await self._abort([a.entry_id for a in allocs])
            raise
        return list(done.entry_ids), list(done.lease_ids), allocs[-1].entry_id if own is not None else ""

    async def lookup_prefix(self, fingerprint: str, block_keys: Sequence[str], *,
                            ttl_s: float | None = None) -> PrefixRead:
        """Lease and map the longest usable cached prefix. Damaged entries raise DataLoss (leases released)."""
        plane = await self._data_plane()
        hit = await self._call("LookupPrefix", pb.LookupPrefixRequest(
            fingerprint=fingerprint, block_keys=list(block_keys), ttl_ns=_ns(ttl_s)))
        parts = [*hit.kv_blocks, *([hit.snapshot] if hit.HasField("snapshot") else [])]
        try:
            size = sum(p.segment.length for p in parts)
            read = [tensors for tensors, _ in await self._data_work(size, plane.read_parts, parts, fingerprint)]
        except BaseException as exc:
            await self.release_leases(hit.lease_ids)
            if isinstance(exc, NotFound):  # bytes gone from under the index (a restarted Mooncake master)
                await self._delete_quietly(_gone(exc, parts))  # drop the entry
            raise
        snapshot = read[-1] if hit.HasField("snapshot") else None
        return PrefixRead(hit.blocks, hit.num_tokens, [p.entry_id for p in hit.kv_blocks],
                          read[:len(hit.kv_blocks)], snapshot, list(hit.lease_ids))

    async def release_leases(self, lease_ids: Sequence[str]) -> None:
        if lease_ids:
            await self._call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=list(lease_ids)))

    # ---- reading a checkpoint ------------------------------------------------------------------------------
    async def get_checkpoint(self, checkpoint_id: str, expected_fingerprint: str,
                             expected_shapes: ShapeSpec | None = None,
                             expected_dtypes: Mapping[str, torch.dtype] | None = None, *,
                             ttl_s: float | None = None) -> LeasedCheckpoint:
        """Lease, map and check a checkpoint. Release it with `release` once its tensors are copied out."""
        plane = await self._data_plane()
        lease = await self._call("AcquireLease", _acquire_request(checkpoint_id, expected_fingerprint, ttl_s))
        try:
            size = sum(p.segment.length for p in lease.parts)
            return await self._data_work(size, plane.read, lease, expected_fingerprint, expected_shapes,
                                         expected_dtypes)
        except BaseException as exc:
            if isinstance(exc, NotFound):  # never reuse shared entries whose bytes are gone
                await self._delete_quietly(_gone(exc, lease.parts))
            with contextlib.suppress(QwenpdError):
                await self.release(lease.lease_id)
            raise

    async def pin(self, checkpoint_id: str, expected_fingerprint: str, *, ttl_s: float | None = None
                  ) -> tuple[str, float]:
        """Lease a checkpoint without reading it, so the store cannot evict it; returns the lease id and its
        seconds to live (release it with `release`). NotFound if it is gone."""
        lease = await self._call("AcquireLease", _acquire_request(checkpoint_id, expected_fingerprint, ttl_s))
        return lease.lease_id, lease.ttl_ns / 1e9

    async def release(self, lease: LeasedCheckpoint | str, *, delete: bool = False) -> None:
        """End a lease (NotFound if it already expired); with delete, also drop the checkpoint."""
        await self._call("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=_lease_id(lease), delete_checkpoint=delete))

    @contextlib.asynccontextmanager
    async def checkpoint(self, checkpoint_id: str, expected_fingerprint: str,
                         expected_shapes: ShapeSpec | None = None,
                         expected_dtypes: Mapping[str, torch.dtype] | None = None, *, ttl_s: float | None = None,
                         delete: bool = False) -> AsyncIterator[LeasedCheckpoint]:
        """get_checkpoint + release on exit. Raises DataLoss at exit if the lease expired meanwhile."""
        ckpt = await self.get_checkpoint(checkpoint_id, expected_fingerprint, expected_shapes, expected_dtypes,
                                         ttl_s=ttl_s)
        try:
            yield ckpt
        except BaseException:
            ckpt.tensors.clear()  # the views die with the lease
            with contextlib.suppress(QwenpdError):
                await self.release(ckpt, delete=delete)
            raise
        ckpt.tensors.clear()
        try:
            await self.release(ckpt, delete=delete)
        except NotFound as exc:
            raise _torn(exc) from None

    async def delete(self, checkpoint_id: str) -> None:
        await self._call("DeleteCheckpoint", pb.DeleteCheckpointRequest(checkpoint_id=checkpoint_id))

    async def _delete_quietly(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            with contextlib.suppress(QwenpdError):
                await self.delete(entry_id)

    async def stats(self) -> pb.StoreStats:
        return await self._call("GetStats", pb.GetStatsRequest())

    async def close(self) -> None:
        if self._plane is not None:
            self._plane.close()
        await self._close_channel()

    async def __aenter__(self) -> "AsyncCacheStoreClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _BlockingTransport(AsyncCacheStoreClient):
    """AsyncCacheStoreClient's calls over a blocking channel: its coroutines never suspend (RPCs block, data-plane
    work runs inline), so CacheStoreClient drives them to completion with one `send`, on the caller's thread."""

    offload_bytes = None

    def _open_channel(self, address: str, security: Security | None) -> Any:
        return secure_channel(address, security, _CHANNEL_OPTIONS)

    async def _close_channel(self) -> None:
        self._channel.close()


class CacheStoreClient:
    """Blocking client with AsyncCacheStoreClient's calls: the same implementation over a blocking channel, run
    on the calling thread (no event loop, no thread hop; data-plane work on the caller's thread). Thread-safe."""

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, io_threads: int | None = None,
                 security: Security | None = None):
        self._async = _BlockingTransport(address, timeout_s=timeout_s, io_threads=io_threads, security=security)

    @property
    def address(self) -> str:
        return self._async.address

    @property
    def timeout_s(self) -> float:
        return self._async.timeout_s

    @staticmethod
    def _run(call: Callable[[], Any]) -> Any:
        """Run the coroutine `call()`, which never suspends over the blocking transport, to its result."""
        coro = call()
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError("a blocking cache-store call suspended")  # a bug: something awaited real I/O

    def info(self) -> pb.StoreInfo:
        return self._run(self._async.info)

    def put_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta, *,
                       handoff_ttl_s: float | None = None, refs: Sequence[str] = ()) -> str:
        return self._run(lambda: self._async.put_checkpoint(tensors, meta, handoff_ttl_s=handoff_ttl_s, refs=refs))

    def put_shared(self, items: Sequence[SharedItem], fingerprint: str) -> list[str]:
        return self._run(lambda: self._async.put_shared(items, fingerprint))

    def put_prefix_checkpoint(self, items: Sequence[SharedItem], tensors: Mapping[str, torch.Tensor],
                              meta: CheckpointMeta, known_refs: Sequence[str], new_refs: int, *,
                              handoff_ttl_s: float | None = None) -> str:
        return self._run(lambda: self._async.put_prefix_checkpoint(items, tensors, meta, known_refs, new_refs,
                                                                   handoff_ttl_s=handoff_ttl_s))

    def lookup_prefix(self, fingerprint: str, block_keys: Sequence[str], *, ttl_s: float | None = None) -> PrefixRead:
        return self._run(lambda: self._async.lookup_prefix(fingerprint, block_keys, ttl_s=ttl_s))

    def release_leases(self, lease_ids: Sequence[str]) -> None:
        self._run(lambda: self._async.release_leases(lease_ids))

    def get_checkpoint(self, checkpoint_id: str, expected_fingerprint: str, expected_shapes: ShapeSpec | None = None,
                       expected_dtypes: Mapping[str, torch.dtype] | None = None, *,
                       ttl_s: float | None = None) -> LeasedCheckpoint:
        return self._run(lambda: self._async.get_checkpoint(checkpoint_id, expected_fingerprint, expected_shapes,
                                                            expected_dtypes, ttl_s=ttl_s))

    def pin(self, checkpoint_id: str, expected_fingerprint: str, *, ttl_s: float | None = None
            ) -> tuple[str, float]:
        return self._run(lambda: self._async.pin(checkpoint_id, expected_fingerprint, ttl_s=ttl_s))

    def release(self, lease: LeasedCheckpoint | str, *, delete: bool = False) -> None:
        self._run(lambda: self._async.release(lease, delete=delete))

    @contextlib.contextmanager
    def checkpoint(self, checkpoint_id: str, expected_fingerprint: str, expected_shapes: ShapeSpec | None = None,
                   expected_dtypes: Mapping[str, torch.dtype] | None = None, *, ttl_s: float | None = None,
                   delete: bool = False) -> Iterator[LeasedCheckpoint]:
        """AsyncCacheStoreClient.checkpoint, blocking."""
        manager = self._async.checkpoint(checkpoint_id, expected_fingerprint, expected_shapes, expected_dtypes,
                                         ttl_s=ttl_s, delete=delete)
        ckpt = self._run(manager.__aenter__)
        try:
            yield ckpt
        except BaseException:
            failure = sys.exc_info()
            if not self._run(lambda: manager.__aexit__(*failure)):
                raise
        else:
            self._run(lambda: manager.__aexit__(None, None, None))

    def delete(self, checkpoint_id: str) -> None:
        self._run(lambda: self._async.delete(checkpoint_id))

    def stats(self) -> pb.StoreStats:
        return self._run(self._async.stats)

    def close(self) -> None:
        self._run(self._async.close)

    def __enter__(self) -> "CacheStoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1_000_000_000)


def _allocate_request(writer: CheckpointWriter) -> pb.AllocateSegmentRequest:
    return pb.AllocateSegmentRequest(size_bytes=writer.nbytes, kind=pb.ENTRY_KIND_CHECKPOINT)


def _commit_request(entry_id: str, meta: CheckpointMeta, handoff_ttl_s: float | None,
                    refs: Sequence[str] = ()) -> pb.CommitCheckpointRequest:
    return pb.CommitCheckpointRequest(entry_id=entry_id, fingerprint=meta.fingerprint, num_tokens=meta.num_tokens,
                                      metadata=dict(meta.extra), handoff_ttl_ns=_ns(handoff_ttl_s),
                                      referenced_entry_ids=list(refs))


def _acquire_request(checkpoint_id: str, expected_fingerprint: str, ttl_s: float | None) -> pb.AcquireLeaseRequest:
    return pb.AcquireLeaseRequest(checkpoint_id=checkpoint_id, expected_fingerprint=expected_fingerprint,
                                  ttl_ns=_ns(ttl_s))


def _lease_id(lease: LeasedCheckpoint | str) -> str:
    return lease.lease_id if isinstance(lease, LeasedCheckpoint) else lease


def _gone(exc: NotFound, parts: Sequence[pb.ManifestPart]) -> list[str]:
    """Entries whose bytes the data plane reported missing (mooncake: evicted, or a restarted master)."""
    return [p.entry_id for p in parts if exc.resource_type == "mooncake_object" and p.segment.name == exc.resource_name]


def _torn(exc: NotFound) -> DataLoss:
    return DataLoss(f"lease expired before release ({exc.message}): the state copied under it may be torn",
                    reason="LEASE_EXPIRED")


