"""Tensors tagged with their memory, the trn2 limits, and the per-kernel SBUF/PSUM ledger.

Limits, from the NKI docs:
- 128 partitions in SBUF and PSUM; an on-chip tensor's first axis is the partition axis and is never strided
  ("Trainium/Inferentia2 Architecture Guide for NKI", aws-neuron-sdk nki/guides/architecture/
  trainium_inferentia2_arch.rst, "Accessing SBUF/PSUM tensors using compute engines").
- A tensor's start partition depends on how many partitions it spans: > 64 -> 0; 33..64 -> 0 or 64;
  1..32 -> 0, 32, 64 or 96 (same guide, same section).
- PSUM: 16 KiB per partition = 8 banks of 2 KiB (512 fp32); a matmul output must sit inside one bank
  (same guide, "Near-memory accumulation in PSUM"; trn2 keeps the 2 MiB PSUM: "Trainium2 Architecture Guide
  for NKI", https://awsdocs-neuron.readthedocs-hosted.com/en/v2.29.0/_sources/nki/guides/architecture/trainium2_arch.rst).
- SBUF on NeuronCore-v3 (trn2): 28 MiB = 128 partitions x 224 KiB (Trainium2 guide above). Part of it is
  reserved by the compiler (nl.tile_size.total_available_sbuf_size, no number published), so the ledger
  enforces 192 KiB per partition (the NeuronCore-v2 size): a kernel that fits here fits trn1 and trn2.

Capacity model: every allocation call (identified by its call stack inside the kernel) owns one buffer,
reused each time the call runs again, e.g. in every loop iteration. That is how the compiler treats a tile
allocated in a loop body. The ledger sums these buffers per memory; PSUM buffers round up to whole banks.
It cannot see lifetimes: tiles from one call kept alive together (say, in a Python list) count once, so the
kernels here give every live tile its own allocation call. The official simulator checks no capacity at all
("Memory Model" in the NKI CPU Simulator guide).
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

PMAX = 128
SBUF_PARTITION_BYTES = 192 * 1024
PSUM_BANK_BYTES = 2 * 1024
PSUM_BANKS = 8
PSUM_PARTITION_BYTES = PSUM_BANK_BYTES * PSUM_BANKS


class ConstraintError(ValueError):
    """A documented hardware or API constraint was violated: this kernel would fail (or be wrong) on trn2."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConstraintError(message)


@dataclass(frozen=True)
class Buffer:
    """A memory: sbuf, psum or one of the HBM kinds."""

    name: str

    @property
    def on_chip(self) -> bool:
        return self.name in ("sbuf", "psum")

    def __repr__(self) -> str:
        return f"nl.{self.name}"


sbuf = Buffer("sbuf")
psum = Buffer("psum")
private_hbm = Buffer("private_hbm")
shared_hbm = Buffer("shared_hbm")
hbm = private_hbm  # documented alias


class Tensor:
    """A NumPy view tagged with its memory. On-chip views remember their start partition in the allocation."""

    __slots__ = ("buffer", "data", "pstart", "root")

    def __init__(self, data: np.ndarray, buffer: Buffer, pstart: int = 0, root: np.ndarray | None = None):
        self.data, self.buffer, self.pstart = data, buffer, pstart
        self.root = data if root is None else root

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def __getitem__(self, index) -> Tensor:
        index = index if isinstance(index, tuple) else (index,)
        pstart = self.pstart
        if self.buffer.on_chip:
            first = index[0] if index else slice(None)
            require(isinstance(first, slice), f"{self.buffer} tensors take a slice on the partition axis, got {first!r}")
            start, _, step = first.indices(self.shape[0])
            require(step == 1, "the partition axis cannot be strided")
            pstart += start
        view = self.data[index]
        require(view.ndim >= 1, "indexing may not reduce a tensor to a scalar")
        return Tensor(view, self.buffer, pstart, self.root)

    def free_byte_range(self) -> tuple[int, int]:
        """[first, last] byte touched inside one partition row of the allocation (for the PSUM bank rule)."""
        base = self.root.__array_interface__["data"][0]
        first = self.data.__array_interface__["data"][0] - base
        last = first + sum((n - 1) * s for n, s in zip(self.shape[1:], self.data.strides[1:])) + self.dtype.itemsize - 1
        row = self.root.strides[0]
        return first % row, first % row + (last - first)

    def __repr__(self) -> str:
        return f"Tensor({self.buffer}, shape={self.shape}, dtype={self.dtype}, start_partition={self.pstart})"


def check_partitions(t: Tensor, what: str) -> None:
    """Partition count and start-partition rules for an on-chip instruction operand."""
    n = t.shape[0]
    require(1 <= n <= PMAX, f"{what}: partition dimension {n} exceeds {PMAX}")
    allowed = (0,) if n > 64 else (0, 64) if n > 32 else (0, 32, 64, 96)
    if t.pstart not in allowed:
        raise ConstraintError(f"{what}: a tensor over {n} partitions must start at partition {allowed}, "
                              f"starts at {t.pstart}")


def check_buffer(t, allowed: tuple[Buffer, ...], what: str) -> Tensor:
    require(isinstance(t, Tensor), f"{what} must be a tensor, got {type(t).__name__}")
    if t.buffer not in allowed:
        raise ConstraintError(f"{what} must be in {'/'.join(b.name for b in allowed)}, is in {t.buffer.name}")
    if t.buffer.on_chip:
        check_partitions(t, what)
    return t


@dataclass
class Ledger:
    """On-chip bytes per partition, per allocation statement, for one kernel run."""

    sites: dict[tuple[str, tuple], int] = field(default_factory=dict)

    def allocate(self, buffer: Buffer, shape: tuple[int, ...], dtype: np.dtype, site: tuple) -> None:
        per_partition = math.prod(shape[1:]) * dtype.itemsize
        if buffer is psum:
            per_partition = -(-per_partition // PSUM_BANK_BYTES) * PSUM_BANK_BYTES
        key = (buffer.name, site)
        self.sites[key] = max(self.sites.get(key, 0), per_partition)
        used = sum(b for (name, _), b in self.sites.items() if name == buffer.name)
        limit = PSUM_PARTITION_BYTES if buffer is psum else SBUF_PARTITION_BYTES
        require(used <= limit, f"{buffer.name} overflow: this kernel's allocations need {used} bytes per partition, "
                               f"the limit is {limit} ({len(self.sites)} allocation statements so far; the last one "
                               f"is {shape} {dtype} at {site[0][0]}:{site[0][1]})")

    def used(self, buffer: Buffer) -> int:
        return sum(b for (name, _), b in self.sites.items() if name == buffer.name)


_state = threading.local()


def active_ledger() -> Ledger:
    ledger = getattr(_state, "ledger", None)
    require(ledger is not None, "NKI tensors can only be created inside a running kernel (use simulate(kernel))")
    return ledger


def set_ledger(ledger: Ledger | None, entry_code=None) -> None:
    _state.ledger, _state.entry_code = ledger, entry_code


def allocation_site(depth: int) -> tuple:
    """The kernel-side call stack of the caller `depth` frames up, up to the kernel entry frame."""
    frame, stack = sys._getframe(depth + 1), []
    entry = getattr(_state, "entry_code", None)
    while frame is not None and frame.f_code is not entry:
        stack.append((frame.f_code.co_filename, frame.f_lineno, frame.f_lasti))  # f_lasti: the call, not the line
        frame = frame.f_back
    return tuple(stack)
