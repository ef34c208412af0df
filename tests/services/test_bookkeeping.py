"""The plain-Python parts of the services and client, without processes: decode admission, the prefill queue,
routing, and the hand-off record."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from qwenpd.clients.routing import BackendPool
from qwenpd.decode_service.scheduler import Scheduler
from qwenpd.engine.sampling import SamplingParams
from qwenpd.errors import Cancelled, DataLoss, DeadlineExceeded, InvalidArgument, ResourceExhausted
from qwenpd.handoff import Handoff, sampling_from_pb, sampling_to_pb, with_seed
from qwenpd.prefill_service.queue import Job, WorkQueue
from qwenpd.protos.qwenpd.v1 import common_pb2


# ---- decode admission ----------------------------------------------------------------------------------------------
class Seq:  # sequences are told apart by identity, like the decode service's
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_scheduler_admits_fifo_up_to_max_batch_and_bounds_the_queue():
    s: Scheduler[Seq] = Scheduler(max_batch=2, max_queued=1)
    a, b, c = Seq("a"), Seq("b"), Seq("c")
    for seq in (a, b, c):
        s.submit(seq)
    with pytest.raises(ResourceExhausted):
        s.submit(Seq("d"))
    rnd = s.next_round(idle=True)
    assert (rnd.leave, rnd.join) == ([], [a, b])
    assert s.load().active == 2 and s.load().queued == 1 and s.load().free_slots == 0
    s.finish(a)
    assert s.next_round(idle=False).join == [c]


def test_scheduler_cancel_waiting_at_once_running_at_next_round():
    s: Scheduler[Seq] = Scheduler(max_batch=1, max_queued=4)
    a, b = Seq("a"), Seq("b")
    s.submit(a)
    s.submit(b)
    assert s.next_round(idle=True).join == [a]
    s.cancel(b)  # waiting: gone now
    assert s.load().queued == 0
    s.cancel(a)  # running: leaves at the next round, and its slot is free at once after that
    rnd = s.next_round(idle=False)
    assert rnd.leave == [a] and rnd.join == []
    assert s.load().active == 0
    s.cancel(a)  # already gone: no-op
    assert s.next_round(idle=False).leave == []


def test_scheduler_wakes_an_idle_loop_and_closes():
    s: Scheduler[Seq] = Scheduler(max_batch=4, max_queued=4)
    x = Seq("x")
    got = []
    t = threading.Thread(target=lambda: got.append(s.next_round(idle=True, timeout=5)))
    t.start()
    time.sleep(0.05)
    s.submit(x)
    t.join(2)
    assert got[0].join == [x]
    assert s.close() == [x]
    assert s.next_round(idle=True) is None
    with pytest.raises(ResourceExhausted):
        s.submit(Seq("y"))


# ---- prefill queue -------------------------------------------------------------------------------------------------
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


# ---- routing -------------------------------------------------------------------------------------------------------
def test_pool_prefers_least_loaded_then_rotates():
    p = BackendPool(["a", "b", "c"], "decode")
    a, b, c = p.backends
    p.report(a, active=4, queued=0, max_batch=8)
    p.report(b, active=1, queued=0, max_batch=8)
    p.report(c, active=1, queued=0, max_batch=8)
    first = {p.ranked()[0].address for _ in range(4)}
    assert first == {"b", "c"}  # tie between b and c shared round-robin, a never first
    BackendPool.started(b)
    BackendPool.finished(b, ok=False)  # a failing backend ranks last
    assert p.ranked()[-1] is b
    q = BackendPool("x", "prefill")
    BackendPool.started(q.backends[0])
    assert q.backends[0].in_flight == 1
    with pytest.raises(ValueError):
        BackendPool([], "prefill")


# ---- hand-off record -----------------------------------------------------------------------------------------------
def test_sampling_round_trip_and_field_names():
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, seed=7, max_tokens=9, stop=("x",),
                            stop_token_ids=(4,), ignore_eos=True)
    assert sampling_from_pb(sampling_to_pb(params), 16, 512) == params
    defaults = sampling_from_pb(common_pb2.SamplingParams(), 16, 512)
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens, defaults.seed) == (1.0, 1.0, 16, None)
    assert with_seed(defaults).seed is not None
    for pb, field in ((common_pb2.SamplingParams(temperature=math.inf), "sampling.temperature"),
                      (common_pb2.SamplingParams(top_k=0, max_tokens=0), "sampling.max_tokens"),
                      (common_pb2.SamplingParams(stop_token_ids=[512]), "sampling.stop_token_ids")):
        with pytest.raises(InvalidArgument) as info:
            sampling_from_pb(pb, 16, 512)
        assert info.value.field == field


def test_handoff_metadata_round_trip_and_refusals():
    h = Handoff("req", 17, -1.5, "ab", SamplingParams(seed=3, max_tokens=5), 1, 40, 0, tuple(range(10)))
    back = Handoff.from_metadata(h.to_metadata(), 512)
    assert back == Handoff("req", 17, -1.5, "ab", h.sampling, 1, 40, 0, tuple(range(2, 10)))  # last 8 ids kept
    with pytest.raises(DataLoss):
        Handoff.from_metadata({}, 512)
    with pytest.raises(DataLoss):
        Handoff.from_metadata({"qwenpd.handoff": "{not json"}, 512)
    with pytest.raises(DataLoss):
        Handoff.from_metadata(h.to_metadata(), 10)  # first token outside this vocabulary
