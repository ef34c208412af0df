"""Calls that every rank of a tensor-parallel group runs in lockstep, described by data.

Each such operation (a prefill chunk, a decode step, reserving pages, staging a snapshot, ...) is registered
under a stable call name with `@cross_rank("batch.step")`; a name registered twice fails at import, so the
registry is the protocol. On the leader, the outermost cross-rank call first broadcasts a `Call` (the name, its
target by handle, the plain arguments, the handle an object made by the call takes, the handles of objects
dropped since, and how the leader's previous call ended), then runs; nested calls ride along inside it.
Followers look the name up in the registry (never an attribute of the target) and run the same function on
their shard; the collectives inside the forward then meet.

A follower whose call ended differently from the leader's (one raised, the other not, or other exception types),
or that receives a name it does not know, leaves the group (exit 1): the leader's next call raises RankLost. Host
tensors never ride in a Call: state crosses ranks in the canonical layout (state_io.py).

Objects that live on every rank (the engine, sequence states, decode batches, staged slices) carry one seam:
`mirror`, a Mirror (their group and handle) or None when not sharded.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qwenpd.engine.pages import OutOfPages
from qwenpd.engine.tp.group import RankLost, TPGroup

log = logging.getLogger("qwenpd.tp")

_CALLS: dict[str, Callable[..., Any]] = {}  # call name -> the function every rank runs (target first)
ENGINE_HANDLE = 0  # every rank's engine


class ProtocolError(RuntimeError):
    """A follower cannot stay in lockstep with the leader (an unknown call, or an outcome that differs)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """An object that lives on every rank, named in a Call by its handle."""

    handle: int


@dataclass(frozen=True, slots=True)
class Mirror:
    """The seam of an object that lives on every rank: its group and handle."""

    group: TPGroup
    handle: int


@dataclass(frozen=True, slots=True)
class Call:
    """One cross-rank call, as broadcast by the leader."""

    name: str
    target: int  # handle
    args: tuple
    kwargs: dict[str, Any]
    creates: int | None  # the handle of the object the call makes
    drops: tuple[int, ...]  # handles the leader no longer holds
    previous: str | None  # how the leader's previous call ended: None = returned, else the exception type's name


def cross_rank(name: str, creates: bool = False):
    """Register the decorated function (method: the target is `self`) as cross-rank call `name`. `creates`: the
    call makes one object that lives on every rank, which must pass through `adopt`."""

    def wrap(fn):
        if name in _CALLS:
            raise RuntimeError(f"cross-rank call {name!r} registered twice")
        _CALLS[name] = fn

        @functools.wraps(fn)
        def call(target, *args, **kwargs):
            mirror = target.mirror
            if mirror is None or not mirror.group.leader:
                return fn(target, *args, **kwargs)
            return mirror.group.calls.lead(Ref(mirror.handle), name, fn, target, args, kwargs, creates)

        call.cross_rank = name
        return call

    return wrap


def adopt(owner: Any, obj: Any) -> Any:
    """Give `obj`, made by the current call of `owner` (an object with a `mirror`), its place on every rank."""
    return obj if owner.mirror is None else owner.mirror.group.calls.adopt(obj)


def mirror_new(owner: Any, name: str, args: tuple, obj: Any) -> None:
    """Leader: have the other ranks make their copy of `obj` with `owner`'s cross-rank call `name` (a constructor
    that ran on the leader only), and adopt it."""
    mirror = owner.mirror
    if mirror is not None and mirror.group.leader:
        calls = mirror.group.calls
        with calls.lock:
            calls.send(Ref(mirror.handle), name, args, {}, creates=True)
            calls.adopt(obj)
            calls.outcome = None


class CallChannel:
    """The calls of one group: the leader sends, followers `follow`."""

    def __init__(self, group: TPGroup):
        self.group = group
        self.lock = threading.RLock()  # one call at a time, from any thread, in the same order on every rank
        self.objects: dict[int, Any] = {}  # followers: handle -> object
        self.outcome: str | None = None  # leader: how its last call ended (travels with the next one)
        self._handles = itertools.count(ENGINE_HANDLE + 1)
        self._creating: int | None = None
        self._depth = 0
        self._drops: list[int] = []

    # ---- leader ---------------------------------------------------------------------------------------------
    def lead(self, target: Ref, name: str, fn, obj: Any, args: tuple, kwargs: dict, creates: bool) -> Any:
        with self.lock:
            outermost = self._depth == 0
            if outermost:
                self.send(target, name, args, kwargs, creates)
            self._depth += 1
            try:
                result = fn(obj, *args, **kwargs)
            except RankLost:
                raise
            except BaseException as exc:
                if outermost:
                    self.outcome = type(exc).__name__
                if isinstance(exc, RuntimeError) and not isinstance(exc, OutOfPages):
                    self.group.check_ranks()  # a collective inside failed: a rank died? then say so
                raise
            finally:
                self._depth -= 1
            if outermost:
                self.outcome = None
            return result

    def send(self, target: Ref, name: str, args: tuple, kwargs: dict, creates: bool) -> None:
        self.group.check()
        handle = next(self._handles) if creates else None
        drops, self._drops = tuple(self._drops), []
        call = Call(name, target.handle, tuple(_wire(a) for a in args), {k: _wire(v) for k, v in kwargs.items()},
                    handle, drops, self.outcome)
        try:
            dist.broadcast_object_list([call], src=0, group=self.group.control)
        except Exception as exc:  # noqa: BLE001 - a follower's end of the connection is gone
            self.group.lose(f"sending to the tensor-parallel ranks failed: {exc}")
        self._creating = handle

    def send_close(self) -> None:
        with self.lock:
            dist.broadcast_object_list([None], src=0, group=self.group.control)

    def adopt(self, obj: Any) -> Any:
        handle, self._creating = self._creating, None
        if handle is None:
            return obj
        obj.mirror = Mirror(self.group, handle)
        if self.group.leader:
            weakref.finalize(obj, self._drops.append, handle)  # released on the followers with the next call
        else:
            self.objects[handle] = obj
        return obj

    # ---- followers ------------------------------------------------------------------------------------------
    def follow(self, engine: Any) -> None:
        """Run each call the leader broadcasts on this rank's objects until it closes the group. ProtocolError
        when this rank cannot stay in lockstep."""
        engine.mirror = Mirror(self.group, ENGINE_HANDLE)
        self.objects[ENGINE_HANDLE] = engine
        mine: str | None = None
        last = "(none)"
        while True:
            message: list[Call | None] = [None]
            dist.broadcast_object_list(message, src=0, group=self.group.control)
            call = message[0]
            if call is None:
                return
            if call.previous != mine:
                raise ProtocolError(f"call {last} ended {mine or 'normally'} on rank {self.group.rank} but "
                                    f"{call.previous or 'normally'} on the leader")
            for handle in call.drops:
                obj = self.objects.pop(handle, None)
                if obj is not None and hasattr(obj, "release"):
                    obj.release()
            fn = _CALLS.get(call.name)
            if fn is None:
                raise ProtocolError(f"unknown cross-rank call {call.name!r}")
            last, self._creating = call.name, call.creates
            try:
                fn(self.objects[call.target], *_unwire(self, call.args),
                   **{k: _unwire(self, v) for k, v in call.kwargs.items()})
                mine = None
            except Exception as exc:  # noqa: BLE001 - compared with the leader's outcome with the next call
                mine = type(exc).__name__
                log.info("cross-rank call %s raised %s on rank %d", call.name, mine, self.group.rank)
            finally:
                self._creating = None


def _wire(value: Any) -> Any:
    """What of an argument travels: objects that live on every rank as Refs, plain values as they are; host
    tensors (and containers of them), callables: None (state moves through state_io)."""
    if getattr(value, "mirror", None) is not None:
        return Ref(value.mirror.handle)
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


def _unwire(channel: CallChannel, value: Any) -> Any:
    if isinstance(value, Ref):
        return channel.objects[value.handle]
    if isinstance(value, list):
        return [_unwire(channel, v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwire(channel, v) for v in value)
    return value
