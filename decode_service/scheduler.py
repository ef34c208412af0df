"""Admission and batch membership of the decode loop. Plain Python (no tensors, no gRPC), thread-safe: request
handlers on the event loop submit and cancel; the stepping thread takes a `Round` between steps.

Sequences wait in a bounded FIFO until a batch slot is free. A cancelled sequence leaves the waiting line at
once, or the batch at the next step boundary (the stepping thread removes it before stepping again).

With a KV page budget, a sequence is admitted only if the pages of its whole final length fit beside those promised
to every sequence already waiting or running; its promise ends when it leaves (finished, cancelled, closed).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from qwenpd.engine.pages import PageBudget
from qwenpd.errors import ResourceExhausted

S = TypeVar("S")


@dataclass(slots=True)
class Round(Generic[S]):
    """What changes before the next step: sequences to drop from the batch, then sequences to add."""

    leave: list[S] = field(default_factory=list)
    join: list[S] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class LoadInfo:
    active: int
    free_slots: int
    queued: int
    max_batch: int


class Scheduler(Generic[S]):
    """FIFO admission into at most `max_batch` running sequences; at most `max_queued` may wait."""

    def __init__(self, max_batch: int, max_queued: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        self.max_batch = max_batch
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._waiting: deque[S] = deque()
        self._running: list[S] = []  # in the batch, or joining at the next round
        self._leaving: list[S] = []  # cancelled while running: removed at the next round
        self._closed = False
        self.pages = PageBudget(None)  # the engine's KV budget, set once it is loaded
        self._promised: dict[int, int] = {}  # id(seq) -> pages promised to it

    # ---- handler side ----------------------------------------------------------------------------------------
    def check_room(self, pages: int = 0) -> None:
        """Raise ResourceExhausted if a new sequence (needing `pages` KV pages) could not even wait (admission
        control before work)."""
        with self._cond:
            self._check_room()
            self._check_pages(pages)

    def _check_room(self) -> None:
        if self._closed:
            raise ResourceExhausted("decode service is shutting down", subject="decode_batch")
        if len(self._running) + len(self._waiting) >= self.max_batch + self.max_queued:
            raise ResourceExhausted(f"decode batch is full ({self.max_batch} running, {len(self._waiting)} waiting)",
                                    subject="decode_batch", retry_after_s=0.1)

    def submit(self, seq: S, pages: int = 0) -> None:
        """Queue `seq`, promising it `pages` KV pages; ResourceExhausted if no slot can wait or the pages do not fit."""
        with self._cond:
            self._check_room()
            self._check_pages(pages)
            self.pages.reserve(pages)
            self._promised[id(seq)] = pages
            self._waiting.append(seq)
            self._cond.notify()

    def _check_pages(self, pages: int) -> None:
        if self.pages.fits(pages):
            return
        total = self.pages.pages
        if total is not None and pages > total:
            raise ResourceExhausted(f"sequence needs {pages} KV pages, the whole cache has {total}", subject="kv_cache")
        raise ResourceExhausted(f"KV cache is full ({self.pages.reserved} of {total} pages promised, {pages} needed)",
                                subject="kv_cache", retry_after_s=0.1)

    def _unpromise(self, seq: S) -> None:
        self.pages.release(self._promised.pop(id(seq), 0))

    def cancel(self, seq: S) -> None:
        """Take `seq` out: at once if waiting, at the next round if running; no-op if already gone."""
        with self._cond:
            try:
                self._waiting.remove(seq)
                self._unpromise(seq)
                return
            except ValueError:
                pass
            if any(s is seq for s in self._running) and not any(s is seq for s in self._leaving):
                self._leaving.append(seq)
                self._cond.notify()

    def load(self) -> LoadInfo:
        with self._cond:
            active = len(self._running)
            return LoadInfo(active, self.max_batch - active, len(self._waiting), self.max_batch)

    # ---- stepping-thread side ----------------------------------------------------------------------------------
    def next_round(self, idle: bool, timeout: float | None = None) -> Round[S] | None:
        """Changes to apply before the next step. When `idle` (nothing in the batch), block until there is work,
        `timeout` passes (empty Round) or the scheduler closes (None)."""
        with self._cond:
            if idle:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._leaving, timeout)
            if self._closed:
                return None
            leave, self._leaving = self._leaving, []
            for seq in leave:
                self._remove_running(seq)
            join = []
            while self._waiting and len(self._running) < self.max_batch:
                seq = self._waiting.popleft()
                self._running.append(seq)
                join.append(seq)
            return Round(leave, join)

    def finish(self, seq: S) -> None:
        """The stepping thread took `seq` out of the batch (it finished or failed)."""
        with self._cond:
            self._remove_running(seq)
            self._leaving = [s for s in self._leaving if s is not seq]
            self._unpromise(seq)

    def _remove_running(self, seq: S) -> None:
        self._running = [s for s in self._running if s is not seq]

    def close(self) -> list[S]:
        """Stop: wake the stepping thread; return every sequence still waiting or running."""
        with self._cond:
            self._closed = True
            left = [*self._waiting, *self._running]
            self._waiting.clear()
            self._running.clear()
            self._leaving.clear()
            self._promised.clear()
            self.pages.reserved = 0
            self._cond.notify_all()
            return left
