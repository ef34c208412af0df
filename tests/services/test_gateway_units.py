"""Plain parts of the gateway without processes: ejection and in-flight bounds of the routing pools, the time per
output token when tokens share chunks, and the OpenAI request checks."""

from __future__ import annotations

import pytest

from qwenpd.clients.dispatch import Trace
from qwenpd.clients.routing import BackendPool
from qwenpd.errors import ResourceExhausted, Unavailable
from qwenpd.gateway.core import Choice, collect, token_texts
from qwenpd.clients.dispatch import Chunk
from qwenpd.gateway.openai import ApiError, api_error, parse_chat, parse_completion


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


def test_token_texts_concatenate_to_the_output():
    c = Choice(0)
    for chunk in (Chunk([1], "He", [-0.1]), Chunk([2, 3], "llo", [-0.2, -0.3]), Chunk([], " w", []),
                  Chunk([4], "orld", [-0.4], "stop")):
        collect(c, chunk)
    assert "".join(c.token_texts) == "".join(c.text) == "Hello world"
    assert len(c.token_texts) == len(c.token_ids) == 4 and c.finish_reason == "stop"
    assert token_texts([], "x") == []


def test_openai_requests_become_prefill_requests():
    p = parse_completion({"model": "m", "prompt": [[1, 2], "hi"], "max_tokens": 5, "temperature": 0, "seed": -1,
                          "stop": "x", "n": 2, "user": "alice"})
    assert len(p.prompts) == 2 and p.n == 2
    first, second = p.prompts
    assert list(first.token_ids.ids) == [1, 2] and second.text == "hi"
    s = first.sampling
    assert (s.max_tokens, s.temperature, list(s.stop), first.cache_salt) == (5, 0.0, ["x"], "alice")
    assert s.seed == (1 << 63) - 1  # -1 folded into the unsigned range
    c = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                              {"role": "user", "content": "b"}], "max_completion_tokens": 3,
                    "max_tokens": 9, "logprobs": True}, header_salt="h")
    req = c.prompts[0]
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "a"), ("user", "b")]
    assert req.sampling.max_tokens == 3 and req.cache_salt == "h" and c.logprobs


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": [-1]}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
])
def test_openai_request_checks_name_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert err.value.status == 400 and err.value.param == param


def test_errors_map_to_http_statuses():
    from qwenpd.errors import DeadlineExceeded, InvalidArgument, Unauthenticated

    assert api_error(InvalidArgument("text", "bad")).status == 400
    assert api_error(Unauthenticated("no")).status == 401
    full = api_error(ResourceExhausted("full", retry_after_s=2.5))
    assert (full.status, full.retry_after_s) == (429, 2.5)
    assert api_error(Unavailable("down")).status == 503
    assert api_error(DeadlineExceeded("late")).status == 504
