"""Request traces of the client's dispatch without processes: the time per output token when tokens share
chunks."""

from __future__ import annotations

import pytest

from qwenpd.clients.dispatch import Trace


def test_tpot_counts_tokens_not_chunks():
    """10 tokens: the first known at t=1.0 (prefill's answer), the other 9 arriving in one coalesced chunk at 1.9:
    9 intervals in 0.9 s = 0.1 s per token, not 0 (what timing chunk arrivals would say)."""
    t = Trace(started=0.5)
    t.first_token_at = 1.0
    t.received(1, at=1.0)
    t.received(9, at=1.9)
    assert t.ttft_s == pytest.approx(0.5)
    assert t.decode_s == pytest.approx(0.9)
    assert t.tpot_s == pytest.approx(0.1)
    one = Trace(started=0.0)
    one.first_token_at = 1.0
    one.received(1, at=1.0)
    assert one.tpot_s == 0.0
