"""Checkpoint bytes: a safetensors file (no pickle) carrying qwenpd metadata and a checksum per tensor, written
straight into a caller's buffer (a mapped shared-memory range) and read back zero-copy.

Layout (the safetensors format: 8-byte little-endian header length, JSON header, raw tensor bytes):
    header "__metadata__" (all strings):
        qwenpd.ckpt.format           FORMAT_VERSION
        qwenpd.ckpt.fingerprint      model fingerprint (config + state layout + weights digest)
        qwenpd.ckpt.num_tokens       tokens the state has consumed
        qwenpd.ckpt.checksum         CHECKSUM_ALGORITHM
        qwenpd.ckpt.xxh3.<tensor>    16 hex digits per tensor (see `_combine`)
        qwenpd.ckpt.header_checksum  16 hex digits over the canonical JSON of the rest of the header
        <any other key>              caller metadata (CheckpointMeta.extra), e.g. "qwenpd.handoff"
    The header is space-padded so tensor data starts 64-byte aligned; tensors are stored by decreasing
    element size, so each is aligned to its element size. Dtypes and shapes are in the tensor table.

Checksums are xxh3_64 (about 10x faster than zlib.crc32 here: ~35 GB/s vs ~4 GB/s on one core) over
4 MiB chunks, combined per tensor, so writing (copy + hash) and verifying run on several threads.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import xxhash

from qwenpd.errors import DataLoss, FailedPrecondition

FORMAT_VERSION = "1"
HASH_CHUNK = 4 << 20
CHECKSUM_ALGORITHM = f"xxh3_64-chunks/{HASH_CHUNK}"
KEY_PREFIX = "qwenpd.ckpt."
K_FORMAT, K_FINGERPRINT, K_NUM_TOKENS = KEY_PREFIX + "format", KEY_PREFIX + "fingerprint", KEY_PREFIX + "num_tokens"
K_CHECKSUM, K_XXH3, K_HEADER_CHECKSUM = KEY_PREFIX + "checksum", KEY_PREFIX + "xxh3.", KEY_PREFIX + "header_checksum"
DATA_ALIGN = 64
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_COPY_STEP = 256 << 10  # fits in L2: the hash reads what the copy just wrote from cache, not DRAM
PARALLEL_MIN_BYTES = 8 << 20  # below this, threads cost more than they save
_MAX_DIM, _MAX_NDIM = 1 << 40, 16

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}

ShapeSpec = Mapping[str, Sequence[int]] | Callable[[int], Mapping[str, Sequence[int]]]
Location = tuple[str, str, int]  # a shared-memory file range: directory, file name, byte offset


@runtime_checkable
class SliceOwner(Protocol):
    """Who holds the slices of rank-written tensors (a tensor-parallel group's staged state) and writes them."""

    def write_slices(self, location: Location, placements: list[tuple["RankWritten", int]]) -> None:
        """Write each placed tensor's slices at its offset in the file range `location`; return once every byte
        has landed (or raise)."""

    def joined(self) -> Mapping[str, torch.Tensor]:
        """The whole tensors, assembled (for buffers that are not a file range)."""


@runtime_checkable
class RankWritten(Protocol):
    """A tensor of a checkpoint whose bytes its owner writes in place (engine/tp/state_io.py StagedTensor)."""

    owner: SliceOwner
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def numel(self) -> int: ...

    def element_size(self) -> int: ...

    def materialize(self) -> torch.Tensor:
        """The whole tensor (gathered by the owner)."""


Checkpointable = torch.Tensor | RankWritten


@dataclass(slots=True, frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself besides its tensors. `extra` is free-form caller metadata."""

    fingerprint: str
    num_tokens: int
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {self.num_tokens!r}")
        for k, v in self.extra.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
            if k.startswith(KEY_PREFIX):
                raise ValueError(f"metadata key {k!r} uses the reserved prefix {KEY_PREFIX!r}")


# ---- writing -----------------------------------------------------------------------------------------------
class CheckpointWriter:
    """A planned checkpoint: `nbytes` is known before any byte is written, so the caller can allocate exactly.

    `write_into(buf)` copies each tensor once into `buf` and hashes it there (chunk by chunk, on up to
    `threads` threads), then writes the header. Tensors must not change in between.

    A value that is not a torch.Tensor is a `RankWritten` (tensor-parallel ranks, each writing its own slice).
    Given the file range the buffer is (`location`: shared memory), its owner's `write_slices` writes them there
    and returns once every byte has landed; this writer then only hashes them. Without a location (a plain
    buffer) it copies `materialize()`d tensors like any other.
    """

    def __init__(self, tensors: Mapping[str, Checkpointable], meta: CheckpointMeta, threads: int | None = None):
        self.meta = meta
        self.threads = threads or default_threads()
        self._tensors: list[tuple[str, Any]] = []
        for name, t in tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r}")
            if not isinstance(t, (torch.Tensor, RankWritten)):
                raise ValueError(f"tensor {name}: a {type(t).__name__} is neither a tensor nor rank-written")
            if t.dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored")
            if isinstance(t, torch.Tensor):
                t = t.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                t = t.contiguous()
            self._tensors.append((name, t))
        # decreasing element size keeps every tensor aligned to its element size
        self._tensors.sort(key=lambda item: (-_element_size(item[1]), item[0]))
        self._table: dict[str, dict[str, Any]] = {}
        offset = 0
        for name, t in self._tensors:
            n = math.prod(t.shape) * _element_size(t)
            self._table[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.data_bytes = offset
        placeholder = self._render({name: 0 for name, _ in self._tensors})
        self.header_bytes = _round_up(8 + len(placeholder), DATA_ALIGN) - 8
        self.nbytes = 8 + self.header_bytes + self.data_bytes

    def _render(self, digests: Mapping[str, int]) -> bytes:
        meta = {K_FORMAT: FORMAT_VERSION, K_FINGERPRINT: self.meta.fingerprint,
                K_NUM_TOKENS: str(self.meta.num_tokens), K_CHECKSUM: CHECKSUM_ALGORITHM, **self.meta.extra}
        meta.update({K_XXH3 + name: f"{d:016x}" for name, d in digests.items()})
        header: dict[str, Any] = {"__metadata__": meta, **self._table}
        meta[K_HEADER_CHECKSUM] = f"{_header_digest(header):016x}"
        return json.dumps(header, separators=(",", ":")).encode()

    def write_into(self, buf: Any, location: Location | None = None) -> int:
        """Write the checkpoint into the first `nbytes` of the writable buffer `buf`; return nbytes. `location`
        (directory, file name, offset): the file range `buf` maps, where owners of rank-written values write
        their slices themselves."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise ValueError("checkpoint buffer is read-only")
        if len(view) < self.nbytes:
            raise ValueError(f"checkpoint needs {self.nbytes} bytes, buffer has {len(view)}")
        data_start = 8 + self.header_bytes
        tensors = self._place_remote(location, data_start)
        anchor = (ctypes.c_char * len(view)).from_buffer(view)  # pins the buffer while raw copies run
        try:
            base = ctypes.addressof(anchor)
            items = [(name, src_ptr, data_start + off, n)
                     for name, t in tensors
                     for src_ptr, off, n in _chunks(t.data_ptr() if isinstance(t, torch.Tensor) else None,
                                                    self._table[name]["data_offsets"][0],
                                                    math.prod(t.shape) * _element_size(t))]

            def copy_and_hash(item: tuple[str, int | None, int, int]) -> int:
                # copy a cache-sized step, then hash it while it is hot; both calls release the GIL
                _, src_ptr, dst, n = item
                h = xxhash.xxh3_64()
                for step in range(0, n, _COPY_STEP):
                    m = min(_COPY_STEP, n - step)
                    if src_ptr is not None:  # None: its owners wrote it in place already
                        ctypes.memmove(base + dst + step, src_ptr + step, m)
                    h.update(view[dst + step:dst + step + m])
                return h.intdigest()

            chunk_digests = _run(copy_and_hash, items, self.data_bytes, self.threads)
            header = self._render(_combine(self._table, items, chunk_digests))
            if len(header) > self.header_bytes:  # digests are fixed-width, so this is a bug, not bad input
                raise AssertionError("checkpoint header grew while writing")
            view[:8] = self.header_bytes.to_bytes(8, "little")
            view[8:8 + len(header)] = header
            view[8 + len(header):data_start] = b" " * (self.header_bytes - len(header))
        finally:
            del anchor
        return self.nbytes

    def _place_remote(self, location: Location | None, data_start: int) -> list[tuple[str, Any]]:
        """Have the owners of rank-written values write them (at `location`), or materialise them (no location).
        Returns the tensors to copy and hash, rank-written ones left as they are (hashed only)."""
        remote = [(name, t) for name, t in self._tensors if not isinstance(t, torch.Tensor)]
        if not remote:
            return self._tensors
        if location is None:
            return [(name, t if isinstance(t, torch.Tensor) else _checked(name, t, t.materialize()))
                    for name, t in self._tensors]
        owners: dict[int, tuple[SliceOwner, list[tuple[RankWritten, int]]]] = {}
        for name, t in remote:
            owners.setdefault(id(t.owner), (t.owner, []))[1].append(
                (t, data_start + self._table[name]["data_offsets"][0]))
        for owner, placements in owners.values():
            owner.write_slices(location, placements)
        return self._tensors


def _element_size(t: Any) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else torch.empty((), dtype=t.dtype).element_size()


def _checked(name: str, planned: Any, t: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != tuple(planned.shape) or t.dtype != planned.dtype:
        raise ValueError(f"tensor {name}: materialised as {tuple(t.shape)} {t.dtype}, planned "
                         f"{tuple(planned.shape)} {planned.dtype}")
    return t.contiguous()


def plan_checkpoint(tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta,
                    threads: int | None = None) -> CheckpointWriter:
    return CheckpointWriter(tensors, meta, threads)


def write_checkpoint(tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta, buf: Any,
                     threads: int | None = None) -> int:
    """Write a checkpoint into `buf` (at least `plan_checkpoint(...).nbytes` long); return its size."""
    return CheckpointWriter(tensors, meta, threads).write_into(buf)


def serialize_checkpoint(tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta) -> bytearray:
    """The checkpoint as a new bytearray (tests, tools; services write into shared memory instead)."""
    writer = CheckpointWriter(tensors, meta)
    out = bytearray(writer.nbytes)
    writer.write_into(out)
    return out


# ---- reading -----------------------------------------------------------------------------------------------
def read_checkpoint(buf: Any, expected_fingerprint: str, expected_shapes: ShapeSpec | None = None,
                    expected_dtypes: Mapping[str, torch.dtype] | None = None, *, verify: bool = True,
                    threads: int | None = None) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Parse and check a checkpoint; return its tensors (zero-copy views of `buf`) and metadata.

    expected_shapes: name -> shape, or a function of the checkpoint's num_tokens returning that mapping
    (the engine's `lambda n: expected_shapes(config, n)`); names must match exactly.
    expected_dtypes: name -> dtype for every tensor. Raises FailedPrecondition on a model, format, name,
    shape or dtype mismatch and DataLoss on checksum or structural corruption. The returned tensors alias
    `buf` (read-only if `buf` is): copy them out before the buffer is released or reused.
    """
    view = memoryview(buf).cast("B")
    header, data_start = _parse_header(view)
    meta_raw = header.pop("__metadata__")
    table = _check_table(header, len(view) - data_start)
    meta = _check_meta(meta_raw, header, expected_fingerprint)
    _check_expected(table, meta.num_tokens, expected_shapes, expected_dtypes)
    if verify:
        _verify_checksums(view, data_start, table, meta_raw, threads or default_threads())
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: the views are read-only by contract
        for name, (dtype, shape, begin, end) in table.items():
            numel = math.prod(shape)
            if numel == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                tensors[name] = torch.frombuffer(view, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
    return tensors, meta


def _parse_header(view: memoryview) -> tuple[dict[str, Any], int]:
    if len(view) < 8:
        raise DataLoss(f"checkpoint truncated: {len(view)} bytes, fewer than the 8-byte header length",
                       reason="CHECKPOINT_TRUNCATED")
    n = int.from_bytes(view[:8], "little")
    if n > len(view) - 8 or n > MAX_HEADER_BYTES:
        raise DataLoss(f"checkpoint truncated or corrupt: header of {n} bytes in a buffer of {len(view)}",
                       reason="CHECKPOINT_TRUNCATED")
    try:
        header = json.loads(bytes(view[8:8 + n]))
    except (ValueError, RecursionError) as exc:
        raise DataLoss(f"checkpoint header is not valid JSON: {exc}", reason="CHECKPOINT_CORRUPT") from None
    if not isinstance(header, dict) or not isinstance(header.setdefault("__metadata__", {}), dict):
        raise DataLoss("checkpoint header is not a safetensors header", reason="CHECKPOINT_CORRUPT")
    if any(not isinstance(v, str) for v in header["__metadata__"].values()):
        raise DataLoss("checkpoint metadata values must be strings", reason="CHECKPOINT_CORRUPT")
    return header, 8 + n


def _check_table(header: dict[str, Any], data_len: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    def corrupt(msg: str) -> DataLoss:
        return DataLoss(f"checkpoint tensor table corrupt: {msg}", reason="CHECKPOINT_CORRUPT")

    table = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"entry {name!r} malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _TORCH_DTYPES:
            raise corrupt(f"{name}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                or any(type(d) is not int or not 0 <= d <= _MAX_DIM for d in shape)):
            raise corrupt(f"{name}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(type(o) is not int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"{name}: bad data_offsets {offsets!r}")
        torch_dtype = _TORCH_DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * torch_dtype.itemsize:
            raise corrupt(f"{name}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}")
        table[name] = (torch_dtype, tuple(shape), offsets[0], offsets[1])
    end = 0
    for name, (_, _, begin, stop) in sorted(table.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != end:
            raise corrupt(f"{name} starts at {begin}, expected {end} (gap or overlap)")
        end = stop
    if end != data_len:
        raise DataLoss(f"checkpoint truncated or corrupt: tensor data is {end} bytes, buffer holds {data_len}",
                       reason="CHECKPOINT_TRUNCATED")
    return table


def _check_meta(meta: dict[str, str], header: dict[str, Any], expected_fingerprint: str) -> CheckpointMeta:
    if K_FORMAT not in meta or K_HEADER_CHECKSUM not in meta:
        raise DataLoss("not a qwenpd checkpoint (format or header checksum missing)", reason="CHECKPOINT_CORRUPT")
    claimed = meta.pop(K_HEADER_CHECKSUM)
    actual = f"{_header_digest({'__metadata__': meta, **header}):016x}"
    meta[K_HEADER_CHECKSUM] = claimed
    if claimed != actual:
        raise DataLoss(f"checkpoint header checksum mismatch ({claimed} stored, {actual} computed)",
                       reason="CHECKSUM_MISMATCH")
    if meta[K_FORMAT] != FORMAT_VERSION:
        raise FailedPrecondition(f"checkpoint format {meta[K_FORMAT]!r} is not supported (this reader: "
                                 f"{FORMAT_VERSION!r})", subject="format", reason="CHECKPOINT_FORMAT")
    if meta.get(K_CHECKSUM) != CHECKSUM_ALGORITHM:
        raise FailedPrecondition(f"checkpoint checksum {meta.get(K_CHECKSUM)!r} is not supported",
                                 subject="checksum", reason="CHECKPOINT_FORMAT")
    fingerprint, tokens = meta.get(K_FINGERPRINT, ""), meta.get(K_NUM_TOKENS, "")
    if not tokens.isdigit() or not fingerprint:
        raise DataLoss("checkpoint metadata lacks fingerprint or num_tokens", reason="CHECKPOINT_CORRUPT")
    if fingerprint != expected_fingerprint:
        raise FailedPrecondition(f"checkpoint was written for model {fingerprint[:16]}, this model is "
                                 f"{expected_fingerprint[:16]}", subject="fingerprint", reason="MODEL_MISMATCH")
    extra = {k: v for k, v in meta.items() if not k.startswith(KEY_PREFIX)}
    return CheckpointMeta(fingerprint, int(tokens), extra)


def check_assembled(tensors: Mapping[str, torch.Tensor], num_tokens: int, expected_shapes: ShapeSpec | None,
                    expected_dtypes: Mapping[str, torch.dtype] | None) -> None:
    """The model checks of read_checkpoint for tensors assembled from several parts."""
    table = {name: (t.dtype, tuple(t.shape), 0, 0) for name, t in tensors.items()}
    _check_expected(table, num_tokens, expected_shapes, expected_dtypes)


def _check_expected(table: Mapping[str, tuple[torch.dtype, tuple[int, ...], int, int]], num_tokens: int,
                    expected_shapes: ShapeSpec | None, expected_dtypes: Mapping[str, torch.dtype] | None) -> None:
    for label, expected in (("shapes", expected_shapes), ("dtypes", expected_dtypes)):
        if expected is None:
            continue
        names = expected(num_tokens) if callable(expected) else expected
        missing, extra = sorted(set(names) - set(table)), sorted(set(table) - set(names))
        absent_allowed = getattr(names, "absent_allowed", None)  # optional groups: all of one or none of it
        if missing and absent_allowed is not None and absent_allowed(set(missing)):
            missing = []
        if missing or extra:
            raise FailedPrecondition(f"checkpoint tensors do not match the model: missing {missing[:4]}, "
                                     f"unexpected {extra[:4]}", subject="tensors", reason="STATE_MISMATCH")
        for name, want in names.items():
            if name not in table:
                continue
            dtype, shape = table[name][0], table[name][1]
            if label == "shapes" and shape != tuple(want):
                raise FailedPrecondition(f"checkpoint tensor {name} has shape {list(shape)}, expected {list(want)}",
                                         subject=name, reason="STATE_MISMATCH")
            if label == "dtypes" and dtype != want:
                raise FailedPrecondition(f"checkpoint tensor {name} has dtype {dtype}, expected {want}",
                                         subject=name, reason="STATE_MISMATCH")


def _verify_checksums(view: memoryview, data_start: int, table: Mapping[str, tuple[Any, Any, int, int]],
                      meta: Mapping[str, str], threads: int) -> None:
    items = [(name, 0, data_start + off, n) for name, (_, _, begin, end) in table.items()
             for _, off, n in _chunks(0, begin, end - begin)]
    digests = _run(lambda item: xxhash.xxh3_64_intdigest(view[item[2]:item[2] + item[3]]), items,
                   sum(end - begin for _, _, begin, end in table.values()), threads)
    actual = _combine(table, items, digests)
    for name, digest in actual.items():
        stored = meta.get(K_XXH3 + name)
        if stored is None:
            raise DataLoss(f"checkpoint has no checksum for tensor {name}", reason="CHECKPOINT_CORRUPT")
        if stored != f"{digest:016x}":
            raise DataLoss(f"checkpoint tensor {name} is corrupt (checksum {stored} stored, {digest:016x} computed)",
                           reason="CHECKSUM_MISMATCH")


# ---- chunked hashing on a small thread pool -------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 1)) - 1),
                                   thread_name_prefix="qwenpd-ckpt")
    return _POOL


def _chunks(src_ptr: int | None, offset: int, nbytes: int) -> list[tuple[int | None, int, int]]:
    """(src pointer, data offset, length) of each HASH_CHUNK piece of one tensor; one empty piece if empty. A
    None source (written in place by its owners) stays None."""
    return [(None if src_ptr is None else src_ptr + i, offset + i, min(HASH_CHUNK, nbytes - i))
            for i in range(0, nbytes, HASH_CHUNK)] or [(src_ptr, offset, 0)]


def _combine(table: Mapping[str, Any], items: Sequence[tuple[str, int, int, int]], digests: Sequence[int]) -> dict[str, int]:
    """Per tensor: xxh3_64 of its chunks' xxh3_64 digests (8 bytes little-endian each, in order)."""
    parts: dict[str, list[bytes]] = {name: [] for name in table}
    for (name, *_), d in zip(items, digests):
        parts[name].append(d.to_bytes(8, "little"))
    return {name: xxhash.xxh3_64_intdigest(b"".join(p)) for name, p in parts.items()}


def _run(fn: Callable[[Any], int], items: Sequence[Any], total_bytes: int, threads: int) -> list[int]:
    """fn over items, split into `threads` contiguous groups of about equal bytes; results in item order."""
    if threads <= 1 or total_bytes < PARALLEL_MIN_BYTES or len(items) < 2:
        return [fn(item) for item in items]
    groups: list[list[Any]] = [[] for _ in range(min(threads, len(items)))]
    share, acc = total_bytes / len(groups), 0
    for item in items:
        groups[min(int(acc // share), len(groups) - 1)].append(item)
        acc += item[-1]
    futures = [_pool().submit(lambda g: [fn(i) for i in g], g) for g in groups[1:]]
    out = [fn(i) for i in groups[0]]
    for f in futures:
        out.extend(f.result())
    return out


def _header_digest(header: Mapping[str, Any]) -> int:
    """xxh3_64 of the header's canonical JSON, without the header checksum itself."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != K_HEADER_CHECKSUM}
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_64_intdigest(canonical.encode())


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to
