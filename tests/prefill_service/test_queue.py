"""The prefill queue without processes: the bounded FIFO in front of the worker, abandoned jobs, and a job's
cancel and deadline checks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from qwenpd.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from qwenpd.prefill_service.queue import Job, WorkQueue


def test_work_queue_is_fifo_bounded_and_skips_abandoned_jobs():
    async def main():
        q: WorkQueue[str] = WorkQueue(max_queued=2)
        release = threading.Event()
        order: list[str] = []

        def work(job: Job) -> str:
            if job.request_id == "first":
                release.wait(5)
            order.append(job.request_id)
            return job.request_id

        first = asyncio.ensure_future(q.run(Job("first"), work))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(q.run(Job("second"), work))
        third = asyncio.ensure_future(q.run(Job("third"), work))
        await asyncio.sleep(0.05)
        assert q.waiting == 2
        with pytest.raises(ResourceExhausted):
            await q.run(Job("fourth"), work)
        second.cancel()  # abandoned while waiting: never runs
        await asyncio.sleep(0.01)  # the task sees its cancellation (and flags the job) before the worker frees up
        release.set()
        assert await first == "first" and await third == "third"
        assert order == ["first", "third"]
        assert q.in_flight == 0
        q.shutdown()

    asyncio.run(main())


def test_job_check_raises_on_cancel_and_deadline():
    job = Job("r", deadline=time.monotonic() + 60)
    job.check()
    job.cancelled.set()
    with pytest.raises(Cancelled):
        job.check()
    with pytest.raises(DeadlineExceeded):
        Job("r", deadline=time.monotonic() - 1).check()
