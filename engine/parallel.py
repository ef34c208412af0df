"""Tensor parallelism: N ranks, each holding its ShardPlan's share of the model, run the same calls in lockstep.

Rank 0, the leader, is the process that serves: its Engine, states and decode batch look like unsharded ones.
Each call that touches the model or a sequence's state is a `mirrored` method: on the leader it is first
broadcast (method name, arguments, the handle of any object it creates) to the other ranks, which `follow` by
running the same method on their own shard; the collectives inside the forward (one all-reduce per mixer and
per MLP, an all-gather of the logits' vocabulary slices) then meet. Host tensors never ride in a message:
state crosses ranks in the canonical full-tensor layout, each rank sending (`gather_state`) or receiving
(`scatter_state`) only its own slices. Control messages use a CPU (gloo) group; activations use the device's
backend (gloo on CPU, nccl on CUDA).

Followers are child processes of the leader, started by `launch`; they die with it (PR_SET_PDEATHSIG) and
leave their loop when it closes the group or its connection drops. A follower that dies marks the group
broken: every later call raises RankLost (UNAVAILABLE), and `on_lost` lets the service go down cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import itertools
import json
import logging
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from qwenpd.engine.blocks import OutOfPages
from qwenpd.engine.sharding import ShardPlan, merge_state, plans, take
from qwenpd.errors import Unavailable

log = logging.getLogger("qwenpd.tp")

_CONTROL_TIMEOUT = timedelta(days=365)  # a follower waits for the next call as long as the leader lives
_COMPUTE_TIMEOUT = timedelta(minutes=10)  # a collective inside a call (compiling a bucket included)
_JOIN_TIMEOUT_S = 300.0


class RankLost(Unavailable):
    """A rank of the tensor-parallel group died: the group cannot compute any more."""


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What a follower needs to build its shard of the engine (the leader's Engine arguments)."""

    model_dir: str
    dtype: str
    threads: int | None
    deltanet_kernels: str
    device: str
    kv_cache_bytes: int | float | None  # bytes, or a fraction of free device memory
    page_size: int
    degree: int


@dataclass(frozen=True, slots=True)
class Ref:
    """A mirrored object named in a message: a state or a decode batch, by its handle."""

    handle: int


def rank_device(device: str, rank: int) -> str:
    """The device of `rank`: one accelerator per rank ("cuda" -> "cuda:<rank>"; on neuron with the process's
    NeuronCores split between the ranks, each sees only its own: "neuron"), the CPU shared."""
    if device == "neuron" and os.environ.get(_SPLIT_CORES):
        return device
    if device in ("cuda", "neuron"):
        return f"{device}:{rank}"
    return device


_SPLIT_CORES = "QWENPD_TP_SPLIT_CORES"  # set when launch gave each rank its share of NEURON_RT_VISIBLE_CORES


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


_SHM: dict[int, ShmCollectives] = {}


@torch.library.custom_op("qwenpd::tp_all_reduce", mutates_args=())
def _shm_all_reduce(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sum over the tensor-parallel ranks of this host (an op, so compiled graphs call it as it is)."""
    return _SHM[group].all_reduce(x.contiguous())


@_shm_all_reduce.register_fake
def _(x: torch.Tensor, group: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qwenpd::tp_all_gather", mutates_args=())
def _shm_all_gather(x: torch.Tensor, group: int, degree: int) -> torch.Tensor:
    """[N, ...] from every tensor-parallel rank of this host -> [degree * N, ...]."""
    return _SHM[group].all_gather(x.contiguous())


@_shm_all_gather.register_fake
def _(x: torch.Tensor, group: int, degree: int) -> torch.Tensor:
    return x.new_empty((degree * x.shape[0], *x.shape[1:]))


class TPGroup:
    """This process's place in a tensor-parallel group of `degree` ranks."""

    def __init__(self, degree: int, rank: int, followers: list[subprocess.Popen] | None = None,
                 host_memory: str | None = None):
        self.degree, self.rank = degree, rank
        self.config = None  # the full model config (set by the engine)
        self.leader = rank == 0
        self.control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
        self.compute = dist.group.WORLD
        self.followers = followers or []
        self.lock = threading.RLock()  # one call at a time, from any thread, in the same order on every rank
        self.objects: dict[int, Any] = {}  # followers: handle -> state or batch
        self.on_lost: Callable[[str], None] = lambda reason: None
        self.broken: str | None = None
        self._handles = itertools.count(1)
        self._creating: int | None = None  # the handle an object created by the current call takes
        self._depth = 0
        self._drops: list[int] = []
        self._closed = False
        self._parent = os.getppid()
        self._maps: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}  # read_state's file mappings
        self.shm = None  # CPU ranks of one host: shared-memory collectives (ShmCollectives)
        if host_memory is not None:
            self.shm = ShmCollectives.open(host_memory, degree, rank, self.control, self._peers_alive)
            if self.shm is not None:
                _SHM[id(self)] = self.shm
        if self.followers:
            threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def _peers_alive(self) -> bool:
        if self.leader:
            return all(p.poll() is None for p in self.followers)
        return os.getppid() == self._parent

    def plan(self) -> ShardPlan:
        """This rank's share of the model (the engine sets `config`)."""
        return ShardPlan(self.config, self.degree, self.rank)

    # ---- collectives inside the forward ---------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks (the row-parallel projections' partial outputs)."""
        from torch.distributed import _functional_collectives as funcol

        if self.shm is not None and self.shm.fits(t):
            return torch.ops.qwenpd.tp_all_reduce(t, id(self))
        return funcol.all_reduce(t, "sum", self.compute)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V/n] vocabulary slices from every rank -> [N, V] (rank order is vocabulary order)."""
        from torch.distributed import _functional_collectives as funcol

        n, part = logits.shape
        if self.shm is not None and self.shm.fits(logits):
            stacked = torch.ops.qwenpd.tp_all_gather(logits, id(self), self.degree)
        else:
            stacked = funcol.all_gather_single(logits.contiguous(), 0, self.compute)  # [degree * N, V/n]
        return stacked.view(self.degree, n, part).permute(1, 0, 2).reshape(n, self.degree * part)

    # ---- the leader's side of a mirrored call ---------------------------------------------------------------
    def send(self, target: Any, method: str, args: tuple, kwargs: dict, creates: bool) -> None:
        """Broadcast one call: `target` is the engine (None) or a mirrored object; `creates` gives the object
        the call makes a handle (`adopt`)."""
        self.check()
        handle = next(self._handles) if creates else None
        drops, self._drops = self._drops, []
        message = [(None if target is None else Ref(target.handle), method, tuple(_wire(a) for a in args),
                    {k: _wire(v) for k, v in kwargs.items()}, handle, drops)]
        try:
            dist.broadcast_object_list(message, src=0, group=self.control)
        except Exception as exc:  # noqa: BLE001 - a follower's end of the connection is gone
            self._lose(f"sending to the tensor-parallel ranks failed: {exc}")
        self._creating = handle

    def adopt(self, obj: Any) -> Any:
        """Give an object made by the current call its handle (the same on every rank)."""
        handle, self._creating = self._creating, None
        if handle is None:
            return obj
        obj.group, obj.handle = self, handle
        if self.leader:
            import weakref

            weakref.finalize(obj, self._drops.append, handle)  # released on the followers with the next call
        else:
            self.objects[handle] = obj
        return obj

    def check(self) -> None:
        if self.broken is not None:
            raise RankLost(self.broken, subject="tensor_parallel")

    def agree_bytes(self, nbytes: int) -> int:
        """The smallest of every rank's `nbytes` (all ranks call it while building their engines): page counts
        must match, or one rank would run out of pages where the leader did not."""
        t = torch.tensor([nbytes], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t)

    def check_ranks(self, wait_s: float = 1.0) -> None:
        """Leader: raise RankLost if a rank has exited (waiting up to `wait_s` for one whose connection just
        dropped to finish exiting)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.broken is not None or any(p.poll() is not None for p in self.followers):
                self._lose("a tensor-parallel rank failed")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    # ---- state across ranks (canonical layout; each rank sends or receives only its slices) -----------------
    def gather_state(self, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every rank's `local` state slices -> canonical tensors on the leader (None elsewhere)."""
        config = self.config
        names = sorted(local)
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(self.degree)]
        for name in names:
            t = local[name].contiguous()
            pieces = [torch.empty_like(t) for _ in range(self.degree)] if self.leader else None
            self._collective(dist.gather, t, pieces, dst=0, group=self.control)
            if self.leader:
                for r, piece in enumerate(pieces):
                    shards[r][name] = piece
        if not self.leader:
            return None
        group_plans = plans(config, self.degree)
        like = {name: torch.empty(canonical_shape(config, name, local[name].shape), dtype=local[name].dtype)
                for name in names}
        return merge_state(shards, group_plans, like)

    def scatter_state(self, canonical: Mapping[str, torch.Tensor] | None,
                      local_shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """The leader's canonical tensors -> each rank's slices (this rank's returned)."""
        config, out = self.config, {}
        group_plans = plans(config, self.degree)
        for name in sorted(local_shapes):
            shape, dtype = local_shapes[name]
            piece = torch.empty(shape, dtype=dtype)
            pieces = None
            if self.leader:
                assert canonical is not None
                src = canonical[name]
                pieces = [take(src, p.state_ranges(name)) for p in group_plans]
            self._collective(dist.scatter, piece, pieces, src=0, group=self.control)
            out[name] = piece
        return out

    def read_state(self, located: Mapping[str, tuple[str, int]],
                   local_shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """This rank's slices of canonical state tensors that lie in shared-memory files (`located`: file, byte
        offset of the tensor's data), read straight from there: dim-0 rows of the canonical layout."""
        plan = self.plan()
        out = {}
        for name, (path, offset) in sorted(located.items()):
            shape, dtype = local_shapes[name]
            itemsize = torch.empty((), dtype=dtype).element_size()
            row = math.prod(shape[1:]) * itemsize
            data = self._mapped(path)
            pieces = [data[offset + start * row: offset + stop * row] for _, start, stop in plan.state_ranges(name)]
            raw = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one range: a view, copied once by the caller
            if raw.numel() != math.prod(shape) * itemsize:
                raise RuntimeError(f"{name} lies outside {path}")
            out[name] = raw.view(dtype).view(shape)
        return out

    def _mapped(self, path: str) -> torch.Tensor:
        """`path` mapped read-only, kept across calls (mapping anew would fault in every page again); remapped when
        the file at `path` is another one (same name, new inode: a restarted store)."""
        import warnings

        st = os.stat(path)
        held = self._maps.get(path)
        if held is not None and held[0] == (st.st_dev, st.st_ino, st.st_size):
            return held[1]
        for gone in [p for p in self._maps if p == path or not os.path.exists(p)]:
            self._maps.pop(gone)  # the mapping goes with the last view of it
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # read-only memory: nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(mm, dtype=torch.uint8)
        self._maps[path] = ((st.st_dev, st.st_ino, st.st_size), data)
        return data

    def _collective(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._lose(f"tensor-parallel transfer failed: {exc}")

    # ---- lifetime ---------------------------------------------------------------------------------------------
    def _lose(self, reason: str) -> None:
        dead = [f"tensor-parallel rank {rank} exited with code {proc.poll()}"
                for rank, proc in enumerate(self.followers, start=1) if proc.poll() is not None]
        if dead:  # the cause, rather than the failed transfer it caused
            reason = dead[0]
        if self.broken is None:
            self.broken = reason
            log.error("tensor-parallel group lost: %s", reason)
            try:
                self.on_lost(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_lost failed")
        raise RankLost(self.broken, subject="tensor_parallel")

    def _watch(self) -> None:
        """Leader: notice a follower that exits (the service must not wait on a collective that never meets)."""
        while not self._closed:
            for rank, proc in enumerate(self.followers, start=1):
                code = proc.poll()
                if code is not None and not self._closed:
                    with contextlib.suppress(RankLost):
                        self._lose(f"tensor-parallel rank {rank} exited with code {code}")
                    self.close()
                    return
            time.sleep(0.2)

    def close(self, timeout: float = 10.0) -> None:
        """Leader: tell the followers to leave, wait for them (kill what lingers). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.leader and self.broken is None:
            with contextlib.suppress(Exception), self.lock:
                dist.broadcast_object_list([None], src=0, group=self.control)
        deadline = time.monotonic() + timeout
        for proc in self.followers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _SHM.pop(id(self), None)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ---- mirrored methods ---------------------------------------------------------------------------------------
def mirrored(creates: bool = False):
    """Decorate a method of Engine, HybridState or DecodeBatch that every rank must run: on the leader the
    outermost such call is broadcast first (nested ones ride along inside it). `creates`: the call makes one
    mirrored object, which must pass through `group.adopt`."""

    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            group = self.group
            if group is None or not group.leader:
                return method(self, *args, **kwargs)
            with group.lock:
                if group._depth == 0:
                    group.send(None if _is_engine(self) else self, method.__name__, args, kwargs, creates)
                group._depth += 1
                try:
                    return method(self, *args, **kwargs)
                except RankLost:
                    raise
                except RuntimeError as exc:  # a collective inside failed: a rank died? then say so (UNAVAILABLE)
                    if not isinstance(exc, OutOfPages):
                        group.check_ranks()
                    raise
                finally:
                    group._depth -= 1
        call.mirrored = True
        return call

    return wrap


def _is_engine(obj: Any) -> bool:
    return not hasattr(obj, "handle")


def _wire(value: Any) -> Any:
    """What of an argument travels: mirrored objects as Refs, plain values as they are; host tensors (and
    containers of them), callables: None (the method moves state with gather/scatter_state)."""
    if hasattr(value, "handle") and hasattr(value, "group"):
        return Ref(value.handle)
    if isinstance(value, torch.Tensor) or callable(value):
        return None
    if isinstance(value, Mapping):
        return None if any(isinstance(v, torch.Tensor) for v in value.values()) else dict(value)
    if isinstance(value, (list, tuple)):
        items = [_wire(v) for v in value]
        if any(isinstance(v, (Mapping, torch.Tensor)) for v in value):
            return None
        return type(value)(items) if isinstance(value, tuple) else items
    return value


def _unwire(group: TPGroup, value: Any) -> Any:
    if isinstance(value, Ref):
        return group.objects[value.handle]
    if isinstance(value, list):
        return [_unwire(group, v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwire(group, v) for v in value)
    return value


def canonical_shape(config, name: str, local: tuple[int, ...]) -> tuple[int, ...]:
    """The full shape of state tensor `name` given a rank's local one (the heads/channels axis is dim 0)."""
    kind = name.rsplit(".", 1)[1]
    full = {"k": config.num_key_value_heads, "v": config.num_key_value_heads, "conv": config.conv_dim,
            "recurrent": config.linear_num_value_heads}[kind]
    return (full, *tuple(local)[1:])


class StagedState:
    """Each rank's slices of some state tensors, copied at one moment (KV blocks, a DeltaNet snapshot, a
    hand-off) and kept on that rank until they are written into a shared checkpoint or dropped: what lets every
    rank write its own slice straight into the shared-memory checkpoint (no gather through rank 0)."""

    def __init__(self, group: TPGroup, local: dict[str, torch.Tensor]):
        self.local = local
        self.group, self.handle = None, 0
        self._plan = group.plan()
        self._joined: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, "StagedTensor"]:
        """The leader's stand-ins for the canonical tensors (CheckpointWriter writes them through us)."""
        config = self._plan.config
        return {name: StagedTensor(self, name, canonical_shape(config, name, t.shape), t.dtype)
                for name, t in self.local.items()}

    def write_slices(self, location: tuple[str, str, int], placements: list[tuple["StagedTensor", int]]) -> None:
        """Every rank writes its slices of the placed tensors into the file range `location` (directory, file,
        offset; each tensor at its offset in the range); returns when all have landed (or raises on every
        rank if one failed)."""
        self._write(location, [(t.name, offset) for t, offset in placements])

    @mirrored()
    def _write(self, location: tuple[str, str, int], placements: list[tuple[str, int]]) -> None:
        directory, name, base = location
        error = None
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                for tensor_name, offset in placements:
                    local = self.local[tensor_name].contiguous()
                    row = local[0].numel() * local.element_size()  # slices are whole rows of dim 0
                    raw = local.view(-1).view(torch.uint8)
                    for (dim, start, stop), local_row in self._plan.write_ranges(tensor_name):
                        assert dim == 0, "state slices run along dim 0"
                        os.pwrite(fd, raw[local_row * row: (local_row + stop - start) * row].numpy(),
                                  base + offset + start * row)
            finally:
                os.close(fd)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
        ok = torch.tensor([0 if error is not None else 1], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group.control)
        if int(ok) == 0:
            raise RuntimeError(f"a tensor-parallel rank failed to write its slices: {error or 'on another rank'}")

    def joined(self) -> dict[str, torch.Tensor]:
        """The canonical tensors, gathered to the leader once (for buffers that are not shared memory)."""
        if self._joined is None:
            self._joined = self._gather()
        return self._joined

    @mirrored()
    def _gather(self) -> dict[str, torch.Tensor] | None:
        return self.group.gather_state(self.local)

    def release(self) -> None:
        self.local = {}


@dataclass(frozen=True, slots=True, eq=False)
class StagedTensor:
    """A canonical state tensor whose slices wait on the ranks (CheckpointWriter's rank-written value)."""

    owner: StagedState
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def materialize(self) -> torch.Tensor:
        return self.owner.joined()[self.name]


# ---- starting a group ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: RankSpec) -> TPGroup:
    """Leader: start ranks 1..degree-1 as child processes and join the group as rank 0. One group per process
    (torch.distributed has one default group): close() an engine's group before starting another."""
    if dist.is_initialized():
        raise RuntimeError("this process already leads a tensor-parallel group: close() that engine first")
    port = _free_port()
    followers = []
    env = dict(os.environ)
    shares = None
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if spec.device == "neuron" and visible:  # the service's NeuronCores, split evenly between its ranks
        from qwenpd.engine.device import split_cores

        shares = split_cores(visible, spec.degree)
        os.environ["NEURON_RT_VISIBLE_CORES"], os.environ[_SPLIT_CORES] = shares[0], "1"
    for rank in range(1, spec.degree):
        if shares is not None:
            env = {**env, "NEURON_RT_VISIBLE_CORES": shares[rank], _SPLIT_CORES: "1"}
        cmd = [sys.executable, "-m", "qwenpd.engine.parallel", "--rank", str(rank), "--port", str(port),
               "--spec", json.dumps(asdict(spec))]
        followers.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
    try:
        _init(0, spec, port)
    except BaseException:
        for proc in followers:
            proc.kill()
            proc.wait()
        raise
    return TPGroup(spec.degree, 0, followers, _host_memory(spec, port))


def _host_memory(spec: RankSpec, port: int) -> str | None:
    """The shared-memory file of CPU ranks' collectives (named by the group's rendezvous port); None elsewhere."""
    if not spec.device.startswith("cpu") or not os.path.isdir("/dev/shm"):
        return None
    return f"/dev/shm/qwenpd-tp-{port}"


def _init(rank: int, spec: RankSpec, port: int) -> None:
    """Join the group: nccl on CUDA, TorchNeuron's "neuron" backend on trn2 (registered by importing
    torch_neuronx; not run here: no Neuron SDK), gloo on CPU."""
    backend = "gloo"
    if spec.device.startswith("cuda"):
        backend = "nccl"
    elif spec.device.startswith("neuron"):
        import torch_neuronx  # noqa: F401 - registers the neuron device and its distributed backend

        backend = "neuron"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=spec.degree,
                            timeout=_COMPUTE_TIMEOUT)


def follow(engine) -> None:
    """A follower's loop: run each call the leader broadcasts, on this rank's engine, until it closes."""
    group: TPGroup = engine.group
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=group.control)
        if message[0] is None:
            return
        target, method, args, kwargs, handle, drops = message[0]
        for h in drops:
            obj = group.objects.pop(h, None)
            if obj is not None and hasattr(obj, "release"):
                obj.release()
        obj = engine if target is None else group.objects[target.handle]
        group._creating = handle
        try:
            getattr(obj, method)(*_unwire(group, args), **{k: _unwire(group, v) for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001 - the leader raised the same (same state, same inputs): carry on
            log.warning("mirrored %s raised on rank %d", method, group.rank, exc_info=True)
        finally:
            group._creating = None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the leader dies, however it dies (no orphan ranks)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    """A follower rank: `python -m qwenpd.engine.parallel --rank R --port P --spec JSON` (started by launch)."""
    parser = argparse.ArgumentParser(prog="qwenpd.engine.parallel")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp-rank{args.rank} %(levelname)s %(message)s")
    spec = RankSpec(**json.loads(args.spec))
    _init(args.rank, spec, args.port)
    from qwenpd.engine.engine import Engine

    group = TPGroup(spec.degree, args.rank, host_memory=_host_memory(spec, args.port))
    try:
        engine = Engine(spec.model_dir, spec.dtype, spec.threads, spec.deltanet_kernels,
                        rank_device(spec.device, args.rank), spec.kv_cache_bytes, spec.page_size, tp=spec.degree,
                        group=group)
        follow(engine)
    except Exception as exc:  # noqa: BLE001 - the leader is gone or the group broke: nothing left to serve
        log.warning("rank %d leaves: %s", args.rank, exc)
        return 1
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # run as the package's module, so pickled Refs and this code share one class
    from qwenpd.engine.parallel import main as _main

    sys.exit(_main())
