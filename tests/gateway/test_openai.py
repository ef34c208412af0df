"""The gateway's OpenAI layer without processes: request bodies become prefill requests, bad parameters are
named, and errors map to HTTP statuses."""

from __future__ import annotations

import pytest

from qwenpd.errors import ResourceExhausted, Unavailable
from qwenpd.gateway.openai import ApiError, api_error, parse_chat, parse_completion


def test_openai_requests_become_prefill_requests():
    p = parse_completion({"model": "m", "prompt": [[1, 2], "hi"], "max_tokens": 5, "temperature": 0, "seed": -1,
                          "stop": "x", "n": 2, "cache_salt": "alice"})
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
    ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
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


def test_every_parameter_is_read_or_refused_by_name():
    """A parameter this server does not implement is a 400 naming it, never ignored: the known-unsupported ones
    and names no endpoint reads alike (typical_p, reasoning_effort); a read one out of range names itself."""
    for body, param in [({"model": "m", "prompt": "x", "typical_p": 0.9}, "typical_p"),
                        ({"model": "m", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
                        ({"model": "m", "prompt": "x", "repetition_penalty": True}, "repetition_penalty"),
                        ({"model": "m", "prompt": "x", "messages": []}, "messages"),
                        ({"model": "m", "prompt": "x", "max_completion_tokens": 3}, "max_completion_tokens")]:
        with pytest.raises(ApiError) as err:
            parse_completion(body)
        assert err.value.status == 400 and err.value.param == param
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for extra, param in [({"reasoning_effort": "low"}, "reasoning_effort"), ({"mirostat": 1}, "mirostat"),
                         ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
                         ({"user": 5}, "user")]:
        with pytest.raises(ApiError) as err:
            parse_chat({**chat, **extra})
        assert err.value.status == 400 and err.value.param == param


def test_enable_thinking_reaches_the_template_and_user_ids_do_not_partition_the_cache():
    on = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                     "chat_template_kwargs": {"enable_thinking": False}}).prompts[0]
    assert on.chat.HasField("enable_thinking") and on.chat.enable_thinking is False
    plain = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).prompts[0]
    assert not plain.chat.HasField("enable_thinking")
    ids = {"user": "alice", "safety_identifier": "s-1", "prompt_cache_key": "k"}
    assert not parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **ids}).prompts[0].cache_salt
    assert not parse_completion({"model": "m", "prompt": "x", **ids}).prompts[0].cache_salt
    salted = parse_completion({"model": "m", "prompt": "x", "cache_salt": "t1", **ids}, header_salt=None)
    assert salted.prompts[0].cache_salt == "t1"
    assert parse_completion({"model": "m", "prompt": "x", "cache_salt": "t1"}, header_salt="h").prompts[0].cache_salt == "h"


def test_sampling_extensions_reach_the_prefill_request():
    p = parse_completion({"model": "m", "prompt": "x", "min_p": 0.05, "logit_bias": {"17": 100, "3": -100.0},
                          "stop_token_ids": [5, 6]})
    s = p.prompts[0].sampling
    assert abs(s.min_p - 0.05) < 1e-12 and dict(s.logit_bias) == {17: 100.0, 3: -100.0}
    assert list(s.stop_token_ids) == [5, 6]
    for bad, param in [({"min_p": 2}, "min_p"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                       ({"logit_bias": {"1": 101}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids")]:
        with pytest.raises(ApiError) as err:
            parse_completion({"model": "m", "prompt": "x", **bad})
        assert err.value.param == param


def test_chat_template_arguments_and_server_defaults():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = parse_chat({**chat, "chat_template_kwargs": {"preserve_thinking": True, "enable_thinking": True}},
                     default_template_kwargs={"enable_thinking": False, "style": "terse"}).prompts[0]
    assert req.chat.enable_thinking is True  # the request's own wins over the server's default
    import json

    assert json.loads(req.chat.template_kwargs_json) == {"style": "terse", "preserve_thinking": True}
    plain = parse_chat(chat, default_template_kwargs={"enable_thinking": False}).prompts[0]
    assert plain.chat.HasField("enable_thinking") and plain.chat.enable_thinking is False


def test_template_arguments_reach_the_template_and_reserved_names_are_refused(tiny_model_dir):
    from qwenpd.engine.tokenizer import Tokenizer, TokenizerError

    tok = Tokenizer(tiny_model_dir)
    tok.chat_template = "{{ greeting }}|{{ messages[0]['content'] }}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], template_kwargs={"greeting": "hi"}) == "hi|x"
    with pytest.raises(TokenizerError, match="set by the server"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], template_kwargs={"messages": []})
