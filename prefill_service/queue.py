"""A bounded FIFO of prefill jobs in front of ONE worker thread (torch releases the GIL, so the event loop keeps
serving while a prompt is encoded). Plain Python: no tensors, no gRPC. The service runs all its tensor work on
this thread, model loading included: torch's OpenMP runtime keeps a thread team per calling thread, and two
teams on the same cores slow each other down.

A job waits in the queue, then runs `fn(job)` on the worker. The caller's cancellation (client gone, deadline)
sets `job.cancelled`; the job's own code checks `job.check()` between chunks and raises, so an abandoned job
stops at the next chunk boundary, and a job still waiting is skipped without running at all.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from qwenpd.errors import Cancelled, DeadlineExceeded, ResourceExhausted

T = TypeVar("T")


@dataclass(slots=True)
class Job:
    """One unit of work: its deadline (time.monotonic() seconds, None = none) and cancellation flag."""

    request_id: str
    deadline: float | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise if the job should stop now (called between chunks, on the worker thread)."""
        if self.cancelled.is_set():
            raise Cancelled(f"request {self.request_id} was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"request {self.request_id} passed its deadline")


class WorkQueue(Generic[T]):
    """FIFO with room for `max_queued` waiting jobs (the running one not counted) and one worker thread."""

    def __init__(self, max_queued: int, thread_name: str = "prefill"):
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished: waiting + running
        self._running = False

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._pending - int(self._running)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._pending

    async def run(self, job: Job, fn: Callable[[Job], T]) -> T:
        """Queue `fn(job)` and wait for it; ResourceExhausted when full. Cancelling the caller abandons the job
        (it is skipped if still waiting, or stops at its next `job.check()`)."""
        with self._lock:
            if self._pending >= self.max_queued + 1:
                raise ResourceExhausted(f"prefill queue is full ({self.max_queued} waiting)",
                                        subject="prefill_queue", retry_after_s=0.1)
            self._pending += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._body, job, fn)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        # the worker always runs the body (never cancelled in the executor), so the count stays exact
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the worker thread outside the queue's bounds (start-up work: loading, warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _body(self, job: Job, fn: Callable[[Job], T]) -> T:
        with self._lock:
            self._running = True
        job.started_at = time.monotonic()
        try:
            job.check()  # abandoned while waiting: skip without work
            return fn(job)
        finally:
            with self._lock:
                self._running = False
                self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
