"""The gateway's OpenAI layer without processes: request bodies become prefill requests, bad parameters are
named, and errors map to HTTP statuses."""

from __future__ import annotations

import pytest

from qwenpd.errors import ResourceExhausted, Unavailable
from qwenpd.gateway.openai import ApiError, api_error, parse_chat, parse_completion


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
