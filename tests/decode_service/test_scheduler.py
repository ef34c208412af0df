"""Decode admission without processes: the Scheduler's FIFO up to max_batch, its bounded queue, cancels, wake-up
and close."""

from __future__ import annotations

import threading
import time

import pytest

from qwenpd.decode_service.scheduler import Scheduler
from qwenpd.errors import ResourceExhausted


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
