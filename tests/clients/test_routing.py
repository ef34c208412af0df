"""The client's routing pools without processes: least-loaded first with rotation, ejection and readmission,
and the in-flight bound."""

from __future__ import annotations

import pytest

from qwenpd.clients.routing import BackendPool
from qwenpd.errors import ResourceExhausted, Unavailable


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


def test_ejected_backends_are_skipped_until_readmitted():
    p = BackendPool(["a", "b"], "decode")
    a, b = p.backends
    assert BackendPool.set_up(a, False) and not BackendPool.set_up(a, False)
    assert p.ranked() == [b]
    BackendPool.set_up(b, False)
    with pytest.raises(Unavailable):
        p.ranked()
    assert BackendPool.set_up(a, True)
    assert p.ranked() == [a] and p.up_count() == 1


def test_in_flight_bound_refuses_with_resource_exhausted():
    p = BackendPool(["a", "b"], "prefill", max_in_flight=1)
    BackendPool.started(p.backends[0])
    assert p.ranked() == [p.backends[1]]
    BackendPool.started(p.backends[1])
    with pytest.raises(ResourceExhausted) as err:
        p.ranked()
    assert err.value.retry_after_s
    BackendPool.finished(p.backends[0], ok=True)
    assert p.ranked() == [p.backends[0]]
