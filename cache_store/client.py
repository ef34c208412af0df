"""Clients of the cache store, sync and asyncio with the same surface. The two calls the services make:

    prefill:  checkpoint_id = client.put_checkpoint(state.to_tensors(), CheckpointMeta(fp, n, {...}))
    decode:   with client.checkpoint(checkpoint_id, fp, lambda n: expected_shapes(config, n), dtypes) as ckpt:
                  state = HybridState.from_tensors(config, ckpt.tensors, ckpt.num_tokens, dtype)  # the one copy

put_checkpoint allocates a segment range, writes the checkpoint straight into it (one copy, checksummed on the
way) and commits it. get_checkpoint leases it and returns zero-copy tensor views of the mapped range, checked
against the model; they are valid only until the lease is released (`release`, or the end of the `with`).
On the mooncake data plane (StoreInfo.data_plane) the same calls put/get Mooncake Store objects instead: one
batch put per write call, one batch get into a fresh registered buffer per read call.
Failures raise qwenpd.errors exceptions (NotFound, FailedPrecondition, ResourceExhausted, DataLoss, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from qwenpd.cache_store.checkpoint import CheckpointMeta, CheckpointWriter, ShapeSpec, check_tensors, read_checkpoint
from qwenpd.cache_store.shm import SegmentMaps, host_id
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb
from qwenpd.protos.qwenpd.v1 import cache_store_pb2_grpc as pb_grpc
from qwenpd.security import Security
from qwenpd.security import channel as secure_channel
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.errors import DataLoss, FailedPrecondition, NotFound, QwenpdError
from qwenpd.grpc_status import from_rpc_error

DEFAULT_TIMEOUT_S = 10.0
_OFFLOAD_BYTES = 1 << 20  # async client: data-plane work above this runs in a thread, off the event loop
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)]


@dataclass(slots=True)
class LeasedCheckpoint:
    """A leased checkpoint. `tensors` alias shared memory: copy them out before releasing the lease."""

    checkpoint_id: str
    lease_id: str
    tensors: dict[str, torch.Tensor]
    meta: CheckpointMeta
    lease_ttl_s: float

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.meta.extra


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


def _cat_tokens(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate [H, n_i, D] pieces along tokens with NumPy's plain memcpy, not torch: a torch op on an I/O
    thread starts a second OpenMP thread team in the process, which then fights the decode loop's team for the
    cores (measured: decode TPOT +40% behind a multi-part read)."""
    dtype = pieces[0].dtype
    if any(p.dtype != dtype or p.ndim != 3 for p in pieces):
        raise ValueError("KV pieces differ in dtype or rank")
    raw = [p.view(torch.int16 if p.element_size() == 2 else torch.int32).numpy() for p in pieces]
    return torch.from_numpy(np.concatenate(raw, axis=1)).view(dtype)


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1_000_000_000)


class _DataPlane:
    """The client's data-plane side: checkpoint write and read over whichever backend the store uses."""

    def __init__(self, io_threads: int | None):
        self.io_threads = io_threads

    def write_many(self, writers: Sequence[CheckpointWriter], allocs: Sequence[pb.Allocation]) -> None:
        raise NotImplementedError

    def fetch(self, refs: Sequence[pb.SegmentRef]) -> list[Any]:
        """The bytes of each range (views where the backend can, fresh buffers otherwise)."""
        raise NotImplementedError

    def write(self, writer: CheckpointWriter, alloc: pb.Allocation) -> None:
        self.write_many([writer], [alloc])

    def read_parts(self, parts: Sequence[pb.ManifestPart], expected_fingerprint: str
                   ) -> list[tuple[dict[str, torch.Tensor], CheckpointMeta]]:
        return [read_checkpoint(buf, expected_fingerprint, threads=self.io_threads)
                for buf in self.fetch([p.segment for p in parts])]

    def read_part(self, part: pb.ManifestPart, expected_fingerprint: str) -> tuple[dict[str, torch.Tensor],
                                                                                  CheckpointMeta]:
        return self.read_parts([part], expected_fingerprint)[0]

    def read(self, lease: pb.Lease, expected_fingerprint: str, expected_shapes: ShapeSpec | None,
             expected_dtypes: Mapping[str, torch.dtype] | None) -> LeasedCheckpoint:
        parts = lease.parts
        if not parts or parts[-1].kind != pb.ENTRY_KIND_CHECKPOINT:
            raise DataLoss("checkpoint manifest does not end with the checkpoint's own bytes",
                           reason="MANIFEST_CORRUPT")
        info = lease.checkpoint
        bufs = self.fetch([p.segment for p in parts])
        if len(parts) == 1:  # self-contained: zero-copy views, checked against the model in one go
            tensors, meta = read_checkpoint(bufs[0], expected_fingerprint, expected_shapes, expected_dtypes,
                                            threads=self.io_threads)
        else:
            tensors, meta = self._read_assembled(bufs, expected_fingerprint, expected_shapes, expected_dtypes)
        if meta.num_tokens != info.num_tokens or meta.fingerprint != info.fingerprint:
            raise DataLoss(f"checkpoint {info.checkpoint_id}: bytes say {meta.num_tokens} tokens, the store says "
                           f"{info.num_tokens}", reason="CHECKPOINT_CORRUPT")
        return LeasedCheckpoint(info.checkpoint_id, lease.lease_id, tensors, meta, lease.ttl_ns / 1e9)

    def _read_assembled(self, bufs: list[Any], expected_fingerprint: str, expected_shapes: ShapeSpec | None,
                        expected_dtypes: Mapping[str, torch.dtype] | None
                        ) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
        """Shared KV blocks (in prefix order) + the checkpoint's own tail KV and DeltaNet state: K/V of each
        layer concatenated along the token axis, then checked against the model like a one-part checkpoint."""
        blocks = [read_checkpoint(b, expected_fingerprint, threads=self.io_threads)[0] for b in bufs[:-1]]
        own, meta = read_checkpoint(bufs[-1], expected_fingerprint, threads=self.io_threads)
        tensors = dict(own)
        for name, tail in own.items():
            if name.endswith((".k", ".v")):
                pieces = [b.get(name) for b in blocks]
                if any(p is None for p in pieces):
                    raise DataLoss(f"a KV block of the checkpoint lacks {name}", reason="MANIFEST_CORRUPT")
                try:
                    tensors[name] = _cat_tokens([*pieces, tail])  # [Hkv, T, D]
                except (RuntimeError, ValueError) as exc:
                    raise FailedPrecondition(f"KV blocks of {name} do not fit together: {exc}", subject=name,
                                             reason="STATE_MISMATCH") from None
        check_tensors(tensors, meta.num_tokens, expected_shapes, expected_dtypes)
        return tensors, meta

    def close(self) -> None:
        pass


class _ShmPlane(_DataPlane):
    """Same host: mappings of the store's segments kept across calls; writes and reads in place."""

    def __init__(self, info: pb.StoreInfo, io_threads: int | None):
        super().__init__(io_threads)
        if info.host_id != host_id():
            raise FailedPrecondition("the cache store runs on another host; its shared-memory data plane is "
                                     "same-host only (run it with --backend mooncake)", subject="host_id",
                                     reason="STORE_ON_OTHER_HOST")
        self.writer_maps = SegmentMaps(info.shm_dir, writable=True)
        self.reader_maps = SegmentMaps(info.shm_dir, writable=False)

    def write_many(self, writers: Sequence[CheckpointWriter], allocs: Sequence[pb.Allocation]) -> None:
        for writer, alloc in zip(writers, allocs):
            seg = alloc.segment
            if seg.length < writer.nbytes:
                raise FailedPrecondition(f"allocation of {seg.length} bytes for a {writer.nbytes}-byte checkpoint",
                                         reason="BAD_ALLOCATION")
            view = self.writer_maps.view(seg.name, seg.offset, writer.nbytes)
            try:
                writer.write_into(view)
            finally:
                view.release()

    def fetch(self, refs: Sequence[pb.SegmentRef]) -> list[Any]:
        return [self.reader_maps.view(r.name, r.offset, r.length) for r in refs]

    def close(self) -> None:
        self.writer_maps.close()
        self.reader_maps.close()


class _MooncakePlane(_DataPlane):
    """Any host: objects in Mooncake Store, one batch put per write call and one batch get per read call."""

    def __init__(self, info: pb.StoreInfo, io_threads: int | None):
        super().__init__(io_threads)
        from qwenpd.cache_store.mooncake import MooncakePlane
        self.plane = MooncakePlane(info.mooncake_master, info.mooncake_metadata)

    def write_many(self, writers: Sequence[CheckpointWriter], allocs: Sequence[pb.Allocation]) -> None:
        for writer, alloc in zip(writers, allocs):
            if alloc.segment.length < writer.nbytes:
                raise FailedPrecondition(f"allocation of {alloc.segment.length} bytes for a {writer.nbytes}-byte "
                                         "checkpoint", reason="BAD_ALLOCATION")
        if writers:
            self.plane.write_many(writers, [a.segment.name for a in allocs])

    def fetch(self, refs: Sequence[pb.SegmentRef]) -> list[Any]:
        return self.plane.read_many([r.name for r in refs], [r.length for r in refs]) if refs else []

    def close(self) -> None:
        self.plane.close()


def data_plane(info: pb.StoreInfo, io_threads: int | None) -> _DataPlane:
    """The client side of the store's data plane (StoreInfo.data_plane)."""
    if info.data_plane == pb.DATA_PLANE_MOONCAKE:
        return _MooncakePlane(info, io_threads)
    return _ShmPlane(info, io_threads)


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


class CacheStoreClient:
    """Blocking client. Every call has a deadline (`timeout_s`)."""

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, io_threads: int | None = None,
                 security: Security | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = secure_channel(address, security, _CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheStoreStub(self._channel)
        self._io_threads = io_threads
        self._info: pb.StoreInfo | None = None
        self._plane: _DataPlane | None = None

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def info(self) -> pb.StoreInfo:
        """The store's description (cached). FailedPrecondition if the store is on another host."""
        if self._plane is None:
            info = self._call("GetStoreInfo", pb.GetStoreInfoRequest())
            self._plane, self._info = data_plane(info, self._io_threads), info
        return self._info  # type: ignore[return-value]

    def _data_plane(self) -> _DataPlane:
        if self._plane is None:
            self.info()
        return self._plane  # type: ignore[return-value]

    def put_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta, *,
                       handoff_ttl_s: float | None = None, refs: Sequence[str] = ()) -> str:
        """Write and commit a checkpoint; returns its id. handoff_ttl_s: how long it stays pinned for its
        reader (None = the store's lease TTL, 0 = not pinned). refs: shared KV blocks (in prefix order) that
        hold the checkpoint's leading KV; `tensors` then carry only the KV after them."""
        writer = CheckpointWriter(tensors, meta, self._io_threads)
        plane = self._data_plane()
        alloc = self._call("AllocateSegment", _allocate_request(writer))
        try:
            plane.write(writer, alloc)
        except BaseException:
            with contextlib.suppress(QwenpdError):
                self._call("AbortAllocation", pb.AbortAllocationRequest(entry_id=alloc.entry_id))
            raise
        return self._call("CommitCheckpoint",
                          _commit_request(alloc.entry_id, meta, handoff_ttl_s, refs)).checkpoint.checkpoint_id

    # ---- prefix cache --------------------------------------------------------------------------------------
    def put_shared(self, items: Sequence[SharedItem], fingerprint: str) -> list[str]:
        """Write KV blocks / snapshots and publish them under their keys; returns the id serving each key (an
        existing entry's where another request cached the same prefix first)."""
        return self._put_prefix(items, fingerprint, None)[0]

    def put_prefix_checkpoint(self, items: Sequence[SharedItem], tensors: Mapping[str, torch.Tensor],
                              meta: CheckpointMeta, known_refs: Sequence[str], new_refs: int, *,
                              handoff_ttl_s: float | None = None) -> str:
        """Publish a prompt's new prefix entries and its hand-off checkpoint together: all ranges are allocated
        in one call (all or nothing, so the hand-off never waits behind the request's own fresh entries), the
        shared entries are committed under leases, then the checkpoint referencing `known_refs` + the first
        `new_refs` new entries (the new KV blocks, in prefix order). Returns the checkpoint id."""
        ids, leases, ckpt = self._put_prefix(items, meta.fingerprint, (tensors, meta))
        try:
            refs = [*known_refs, *ids[:new_refs]]
            return self._call("CommitCheckpoint", _commit_request(ckpt, meta, handoff_ttl_s, refs)).checkpoint.checkpoint_id
        except BaseException:
            with contextlib.suppress(QwenpdError):
                self._call("AbortAllocation", pb.AbortAllocationRequest(entry_id=ckpt))
            raise
        finally:
            self.release_leases(leases)

    def _put_prefix(self, items: Sequence[SharedItem], fingerprint: str,
                    own: tuple[Mapping[str, torch.Tensor], CheckpointMeta] | None) -> tuple[list[str], list[str], str]:
        plane = self._data_plane()
        writers = [CheckpointWriter(it.tensors, CheckpointMeta(fingerprint, it.num_tokens, {}), self._io_threads)
                   for it in items]
        kinds = [it.kind for it in items]
        if own is not None:
            writers.append(CheckpointWriter(own[0], own[1], self._io_threads))
            kinds.append(pb.ENTRY_KIND_CHECKPOINT)
        if not writers:
            return [], [], ""
        allocs = list(self._call("AllocateSegments", pb.AllocateSegmentsRequest(requests=[
            pb.AllocateSegmentRequest(size_bytes=w.nbytes, kind=k) for w, k in zip(writers, kinds)])).allocations)
        try:
            plane.write_many(writers, allocs)
            entries = [pb.SharedEntry(entry_id=a.entry_id, kind=it.kind, prefix_key=it.prefix_key,
                                      fingerprint=fingerprint, num_tokens=it.num_tokens)
                       for a, it in zip(allocs, items)]
            done = self._call("CommitShared", pb.CommitSharedRequest(
                entries=entries, lease_ttl_ns=_ns(60.0) if own is not None and entries else None)) \
                if entries else pb.CommitSharedResponse()
        except BaseException:
            for alloc in allocs:
                with contextlib.suppress(QwenpdError):
                    self._call("AbortAllocation", pb.AbortAllocationRequest(entry_id=alloc.entry_id))
            raise
        return list(done.entry_ids), list(done.lease_ids), allocs[-1].entry_id if own is not None else ""

    def lookup_prefix(self, fingerprint: str, block_keys: Sequence[str], *, ttl_s: float | None = None) -> PrefixRead:
        """Lease and map the longest usable cached prefix. Damaged entries raise DataLoss (leases released)."""
        plane = self._data_plane()
        hit = self._call("LookupPrefix", pb.LookupPrefixRequest(fingerprint=fingerprint, block_keys=list(block_keys),
                                                                ttl_ns=_ns(ttl_s)))
        try:
            parts = [*hit.kv_blocks, *([hit.snapshot] if hit.HasField("snapshot") else [])]
            read = [tensors for tensors, _ in plane.read_parts(parts, fingerprint)]
            kv = read[:len(hit.kv_blocks)]
            snapshot = read[-1] if hit.HasField("snapshot") else None
        except NotFound as exc:  # bytes gone from under the index (a restarted Mooncake master): drop the entry
            self.release_leases(hit.lease_ids)
            for entry_id in _gone(exc, parts):
                with contextlib.suppress(QwenpdError):
                    self.delete(entry_id)
            raise
        except BaseException:
            self.release_leases(hit.lease_ids)
            raise
        return PrefixRead(hit.blocks, hit.num_tokens, [p.entry_id for p in hit.kv_blocks], kv, snapshot,
                          list(hit.lease_ids))

    def release_leases(self, lease_ids: Sequence[str]) -> None:
        if lease_ids:
            self._call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=list(lease_ids)))

    def get_checkpoint(self, checkpoint_id: str, expected_fingerprint: str, expected_shapes: ShapeSpec | None = None,
                       expected_dtypes: Mapping[str, torch.dtype] | None = None, *,
                       ttl_s: float | None = None) -> LeasedCheckpoint:
        """Lease, map and check a checkpoint. Release it with `release` once its tensors are copied out."""
        plane = self._data_plane()
        lease = self._call("AcquireLease", _acquire_request(checkpoint_id, expected_fingerprint, ttl_s))
        try:
            return plane.read(lease, expected_fingerprint, expected_shapes, expected_dtypes)
        except NotFound as exc:
            for entry_id in _gone(exc, lease.parts):  # never reuse shared entries whose bytes are gone
                with contextlib.suppress(QwenpdError):
                    self.delete(entry_id)
            with contextlib.suppress(QwenpdError):
                self.release(lease.lease_id)
            raise
        except BaseException:
            with contextlib.suppress(QwenpdError):
                self.release(lease.lease_id)
            raise

    def release(self, lease: LeasedCheckpoint | str, *, delete: bool = False) -> None:
        """End a lease (NotFound if it already expired); with delete, also drop the checkpoint."""
        self._call("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=_lease_id(lease), delete_checkpoint=delete))

    @contextlib.contextmanager
    def checkpoint(self, checkpoint_id: str, expected_fingerprint: str, expected_shapes: ShapeSpec | None = None,
                   expected_dtypes: Mapping[str, torch.dtype] | None = None, *, ttl_s: float | None = None,
                   delete: bool = False) -> Iterator[LeasedCheckpoint]:
        """get_checkpoint + release on exit. Raises DataLoss at exit if the lease expired meanwhile."""
        ckpt = self.get_checkpoint(checkpoint_id, expected_fingerprint, expected_shapes, expected_dtypes, ttl_s=ttl_s)
        try:
            yield ckpt
        except BaseException:
            ckpt.tensors.clear()
            with contextlib.suppress(QwenpdError):
                self.release(ckpt, delete=delete)
            raise
        ckpt.tensors.clear()
        try:
            self.release(ckpt, delete=delete)
        except NotFound as exc:
            raise _torn(exc) from None

    def delete(self, checkpoint_id: str) -> None:
        self._call("DeleteCheckpoint", pb.DeleteCheckpointRequest(checkpoint_id=checkpoint_id))

    def stats(self) -> pb.StoreStats:
        return self._call("GetStats", pb.GetStatsRequest())

    def close(self) -> None:
        if self._plane is not None:
            self._plane.close()
        self._channel.close()

    def __enter__(self) -> "CacheStoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCacheStoreClient:
    """asyncio client with the same surface; data-plane copies run in a worker thread."""

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, io_threads: int | None = None,
                 security: Security | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = secure_channel(address, security, _CHANNEL_OPTIONS, aio=True)
        self._stub = pb_grpc.CacheStoreStub(self._channel)
        self._io_threads = io_threads
        self._info: pb.StoreInfo | None = None
        self._plane: _DataPlane | None = None

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def info(self) -> pb.StoreInfo:
        """The store's description (cached). FailedPrecondition if the store is on another host."""
        if self._plane is None:
            info = await self._call("GetStoreInfo", pb.GetStoreInfoRequest())
            self._plane, self._info = data_plane(info, self._io_threads), info
        return self._info  # type: ignore[return-value]

    async def _data_plane(self) -> _DataPlane:
        if self._plane is None:
            await self.info()
        return self._plane  # type: ignore[return-value]

    async def put_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta, *,
                             handoff_ttl_s: float | None = None) -> str:
        writer = CheckpointWriter(tensors, meta, self._io_threads)
        plane = await self._data_plane()
        alloc = await self._call("AllocateSegment", _allocate_request(writer))
        try:
            if writer.nbytes > _OFFLOAD_BYTES:
                await asyncio.to_thread(plane.write, writer, alloc)
            else:
                plane.write(writer, alloc)
        except BaseException:
            with contextlib.suppress(QwenpdError):
                await self._call("AbortAllocation", pb.AbortAllocationRequest(entry_id=alloc.entry_id))
            raise
        response = await self._call("CommitCheckpoint", _commit_request(alloc.entry_id, meta, handoff_ttl_s))
        return response.checkpoint.checkpoint_id

    async def get_checkpoint(self, checkpoint_id: str, expected_fingerprint: str,
                             expected_shapes: ShapeSpec | None = None,
                             expected_dtypes: Mapping[str, torch.dtype] | None = None, *,
                             ttl_s: float | None = None) -> LeasedCheckpoint:
        plane = await self._data_plane()
        lease = await self._call("AcquireLease", _acquire_request(checkpoint_id, expected_fingerprint, ttl_s))
        try:
            size = sum(p.segment.length for p in lease.parts)
            args = (lease, expected_fingerprint, expected_shapes, expected_dtypes)
            return await asyncio.to_thread(plane.read, *args) if size > _OFFLOAD_BYTES else plane.read(*args)
        except NotFound as exc:
            for entry_id in _gone(exc, lease.parts):  # never reuse shared entries whose bytes are gone
                with contextlib.suppress(QwenpdError):
                    await self.delete(entry_id)
            with contextlib.suppress(QwenpdError):
                await self.release(lease.lease_id)
            raise
        except BaseException:
            with contextlib.suppress(QwenpdError):
                await self.release(lease.lease_id)
            raise

    async def release(self, lease: LeasedCheckpoint | str, *, delete: bool = False) -> None:
        await self._call("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=_lease_id(lease), delete_checkpoint=delete))

    @contextlib.asynccontextmanager
    async def checkpoint(self, checkpoint_id: str, expected_fingerprint: str,
                         expected_shapes: ShapeSpec | None = None,
                         expected_dtypes: Mapping[str, torch.dtype] | None = None, *, ttl_s: float | None = None,
                         delete: bool = False) -> AsyncIterator[LeasedCheckpoint]:
        ckpt = await self.get_checkpoint(checkpoint_id, expected_fingerprint, expected_shapes, expected_dtypes,
                                         ttl_s=ttl_s)
        try:
            yield ckpt
        except BaseException:
            ckpt.tensors.clear()
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

    async def stats(self) -> pb.StoreStats:
        return await self._call("GetStats", pb.GetStatsRequest())

    async def close(self) -> None:
        if self._plane is not None:
            self._plane.close()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncCacheStoreClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
