"""Collectives of CPU ranks on one host through one shared-memory file (all-reduce, all-gather), and their
`qwenpd::` ops, so compiled graphs call them as they are. Used by TPGroup (group.py) when its ranks are CPU
processes of one host; gloo carries the rest.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from qwenpd.kernels import ops

log = logging.getLogger("qwenpd.tp")


class ShmCollectives:
    """All-reduce and all-gather of CPU tensors through one shared-memory file, for ranks on one host: each rank
    copies its tensor into its slot, marks its flag with the operation's sequence number and spins until every
    flag has it, then reads all slots (summing in rank order, so every rank computes the same bits). Slots are
    double-buffered by sequence parity, so one barrier per operation suffices: a rank cannot start operation
    n+2 before every other has finished reading n. On this 2-core VM gloo's loopback all-reduce of 32 KiB takes
    ~1 ms; this takes microseconds. Tensors above `slot_bytes` go through gloo. x86-64 only (its stores are
    seen in order; elsewhere gloo is used)."""

    _FLAG_STRIDE = 8  # int64s: one cache line per rank's flag

    def __init__(self, mm: mmap.mmap, degree: int, rank: int, slot_bytes: int, peers_alive: Callable[[], bool]):
        import numpy as np

        self.mm, self.degree, self.rank, self.slot_bytes = mm, degree, rank, slot_bytes
        self.flags = np.frombuffer(mm, dtype=np.int64, count=degree * self._FLAG_STRIDE)
        self.data = torch.frombuffer(mm, dtype=torch.uint8, offset=self._header(degree))
        self.seq = 0
        self.peers_alive = peers_alive

    @classmethod
    def _header(cls, degree: int) -> int:
        return degree * cls._FLAG_STRIDE * 8

    @classmethod
    def open(cls, path: str, degree: int, rank: int, control, peers_alive: Callable[[], bool],
             slot_bytes: int = 8 << 20) -> "ShmCollectives | None":
        """Every rank calls this together; None on every rank if any could not map the file (gloo then)."""
        import platform

        size = cls._header(degree) + 2 * degree * slot_bytes
        mm, ok = None, platform.machine() in ("x86_64", "AMD64")
        if ok and rank == 0:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a crashed group's, whose port this one reuses
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, size)
                    mm = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("shared-memory collectives unavailable (%s); using gloo", exc)
                ok = False
        created = torch.tensor([int(ok)], dtype=torch.int32)
        dist.broadcast(created, src=0, group=control)
        if int(created) and rank != 0:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    mm = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            except OSError:
                ok = False
        opened = torch.tensor([int(ok and int(created))], dtype=torch.int32)
        dist.all_reduce(opened, op=dist.ReduceOp.MIN, group=control)
        if rank == 0 and int(created):
            with contextlib.suppress(OSError):
                os.unlink(path)  # mapped by every rank now: nothing is left behind whatever happens next
        if not int(opened):
            if mm is not None:
                mm.close()
            return None
        return cls(mm, degree, rank, slot_bytes, peers_alive)

    def fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() * 4 <= self.slot_bytes

    def _slot(self, parity: int, rank: int, numel: int) -> torch.Tensor:
        start = (parity * self.degree + rank) * self.slot_bytes
        return self.data[start: start + numel * 4].view(torch.float32)

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.seq += 1
        parity, numel = self.seq % 2, t.numel()
        self._slot(parity, self.rank, numel).copy_(t.reshape(-1))
        self.flags[self.rank * self._FLAG_STRIDE] = self.seq
        spins = 0
        while any(int(self.flags[r * self._FLAG_STRIDE]) < self.seq for r in range(self.degree)):
            spins += 1
            if spins > 2000:  # the others are still computing: stop spinning, check they are alive
                time.sleep(0.0001 if spins < 20000 else 0.002)
                if spins % 500 == 0 and not self.peers_alive():
                    raise RuntimeError("a tensor-parallel rank exited during a collective")
        return [self._slot(parity, r, numel) for r in range(self.degree)]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        slots = self._exchange(t)
        out = slots[0].clone()
        for s in slots[1:]:
            out += s
        return out.view(t.shape)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, ...] from every rank -> [degree * N, ...] in rank order."""
        return torch.cat([s.view(t.shape) for s in self._exchange(t)], 0)


_SHM: dict[int, ShmCollectives] = {}  # by the id of the group that opened it


def _all_reduce_code(x: torch.Tensor, group: int) -> torch.Tensor:
    return _SHM[group].all_reduce(x.contiguous())


def _all_gather_code(x: torch.Tensor, group: int, degree: int) -> torch.Tensor:
    return _SHM[group].all_gather(x.contiguous())


@torch.library.custom_op("qwenpd::tp_all_reduce", mutates_args=())
def _shm_all_reduce(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sum over the tensor-parallel ranks of this host (an op, so compiled graphs call it as it is)."""
    return _all_reduce_code(x, group)


@_shm_all_reduce.register_fake
def _(x: torch.Tensor, group: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qwenpd::tp_all_gather", mutates_args=())
def _shm_all_gather(x: torch.Tensor, group: int, degree: int) -> torch.Tensor:
    """[N, ...] from every tensor-parallel rank of this host -> [degree * N, ...]."""
    return _all_gather_code(x, group, degree)


@_shm_all_gather.register_fake
def _(x: torch.Tensor, group: int, degree: int) -> torch.Tensor:
    return x.new_empty((degree * x.shape[0], *x.shape[1:]))


# What TPGroup calls: the ops in a graph being compiled, their code directly otherwise (an op's first eager call
# imports torch._dynamo: kernels/ops.py `direct`).
all_reduce = ops.direct(_shm_all_reduce, _all_reduce_code, lambda *args: False)
all_gather = ops.direct(_shm_all_gather, _all_gather_code, lambda *args: False)
