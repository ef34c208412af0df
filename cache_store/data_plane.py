"""The client side of the cache store's data plane: writing checkpoint bytes into the ranges the store allocated
and reading (mapping) them back, checked against the model, over whichever backend the store runs
(`StoreInfo.data_plane`): same-host shared memory (`ShmClientPlane`: mappings kept across calls, writes and
reads in place, zero-copy views) or Mooncake Store (`MooncakeClientPlane`: one batch put per write call, one
batch get into a registered buffer per read call). No RPCs here: the control plane is `cache_store/client.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwenpd.cache_store.checkpoint import (CheckpointMeta, CheckpointWriter, ShapeSpec, check_assembled,
                                           read_checkpoint)
from qwenpd.cache_store.shm import SegmentMaps, host_id
from qwenpd.errors import DataLoss, FailedPrecondition
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb


@dataclass(slots=True)
class LeasedCheckpoint:
    """A leased checkpoint. `tensors` alias shared memory: copy them out before releasing the lease.
    `locations`: for each tensor that is a view of a shared-memory file, (file path, byte offset of its data), so
    other processes of this host (tensor-parallel ranks) can read their slices of it themselves."""

    checkpoint_id: str
    lease_id: str
    tensors: dict[str, torch.Tensor]
    meta: CheckpointMeta
    lease_ttl_s: float
    locations: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.meta.extra


def _cat_tokens(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate [H, n_i, D] pieces along tokens with NumPy's plain memcpy, not torch: a torch op on an I/O
    thread starts a second OpenMP thread team in the process, which then fights the decode loop's team for the
    cores (measured: decode TPOT +40% behind a multi-part read)."""
    dtype = pieces[0].dtype
    if any(p.dtype != dtype or p.ndim != 3 for p in pieces):
        raise ValueError("KV pieces differ in dtype or rank")
    raw = [p.view(torch.int16 if p.element_size() == 2 else torch.int32).numpy() for p in pieces]
    return torch.from_numpy(np.concatenate(raw, axis=1)).view(dtype)


class DataPlane:
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
        return LeasedCheckpoint(info.checkpoint_id, lease.lease_id, tensors, meta, lease.ttl_ns / 1e9,
                                self.locate([p.segment for p in parts], bufs, tensors))

    def locate(self, refs: Sequence[pb.SegmentRef], bufs: Sequence[Any], tensors: Mapping[str, torch.Tensor]
               ) -> dict[str, tuple[str, int]]:
        """(file, offset) of each tensor that is a view of a shared-memory file (none here: see ShmClientPlane)."""
        return {}

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
        check_assembled(tensors, meta.num_tokens, expected_shapes, expected_dtypes)
        return tensors, meta

    def close(self) -> None:
        pass


class ShmClientPlane(DataPlane):
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
            try:  # the location lets tensor-parallel ranks write their slices into the segment themselves
                writer.write_into(view, location=(str(self.writer_maps.dir), seg.name, seg.offset))
            finally:
                view.release()

    def fetch(self, refs: Sequence[pb.SegmentRef]) -> list[Any]:
        return [self.reader_maps.view(r.name, r.offset, r.length) for r in refs]

    def locate(self, refs: Sequence[pb.SegmentRef], bufs: Sequence[Any], tensors: Mapping[str, torch.Tensor]
               ) -> dict[str, tuple[str, int]]:
        spans = [(np.frombuffer(buf, dtype=np.uint8).ctypes.data, len(buf), ref) for ref, buf in zip(refs, bufs)]
        out = {}
        for name, t in tensors.items():
            ptr = t.data_ptr()
            for base, length, ref in spans:  # a view of that part (assembled KV is a fresh buffer: no location)
                if base <= ptr < base + length:
                    out[name] = (str(self.reader_maps.dir / ref.name), ref.offset + ptr - base)
        return out

    def close(self) -> None:
        self.writer_maps.close()
        self.reader_maps.close()


class MooncakeClientPlane(DataPlane):
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


def open_data_plane(info: pb.StoreInfo, io_threads: int | None) -> DataPlane:
    """The client side of the store's data plane (StoreInfo.data_plane)."""
    if info.data_plane == pb.DATA_PLANE_MOONCAKE:
        return MooncakeClientPlane(info, io_threads)
    return ShmClientPlane(info, io_threads)
