"""The gateway's OpenAI layer without processes: request bodies become prefill requests, bad parameters are
named, and errors map to HTTP statuses."""

from __future__ import annotations

import pytest

from qwenpd.errors import ResourceExhausted, Unavailable
from qwenpd.gateway.openai import ApiError, api_error, check_context, parse_chat, parse_completion


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


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra,param", [
    ({"max_tokens": 4294967296}, "max_tokens"), ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_completion_tokens": 2**63}, "max_completion_tokens"), ({"top_k": 2**40}, "top_k"),
    ({"min_tokens": 2**40}, "min_tokens"), ({"logit_bias": {"99999999999999999999": 5}}, "logit_bias"),
    ({"logit_bias": {"²": 5}}, "logit_bias"), ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**63, "stream": True}, "max_tokens"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_integers_past_the_protobuf_fields_are_a_400_naming_them(extra, param):
    with pytest.raises(ApiError) as err:
        parse_chat({**CHAT, **extra})
    assert err.value.status == 400 and err.value.param == param
    assert parse_chat({**CHAT, "seed": -(2**63)}).prompts[0].sampling.seed == 0  # the signed range is taken


@pytest.mark.parametrize("raw,param", [
    ('{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ('{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "\\udc00"}', "stop"),
    ('{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
     '"function": {"name": "a\\udc00"}}]}', "tools[0].function.name"),
    ('{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
])
def test_lone_surrogates_are_a_400_naming_where_they_are(raw, param):
    import json

    with pytest.raises(ApiError) as err:
        parse_chat(json.loads(raw))
    assert err.value.status == 400 and err.value.param == param
    err.value.message.encode()  # the error itself is text
    parse_chat(json.loads('{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'))  # a pair


@pytest.mark.parametrize("extra,param", [
    ({"stream": True, "stream_options": {"foo": 1}}, "stream_options.foo"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "foo": 1}}},
     "response_format.json_schema.foo"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "foo": 1}]}, "messages[0].foo"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "refusal": "no"}]},
     "messages[1].refusal"),
])
def test_unknown_or_missing_parts_are_a_400_naming_them(extra, param):
    with pytest.raises(ApiError) as err:
        parse_chat({**CHAT, **extra})
    assert err.value.status == 400 and err.value.param == param


def test_a_response_message_sent_back_as_history_is_taken():
    """What the openai SDK sends back of our own answer: null OpenAI fields, and the reasoning under both names."""
    history = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
               "function_call": None, "reasoning": "hmm", "tool_calls": [{"id": "c", "type": "function", "function": {
                   "name": "f", "arguments": "{}"}}]}
    p = parse_chat({**CHAT, "messages": [CHAT["messages"][0], history, {"role": "tool", "tool_call_id": "c",
                                                                         "content": "ok"}],
                    "stream": True, "stream_options": {"include_usage": True}})
    assert p.prompts[0].chat.messages[1].reasoning_content == "hmm" and p.include_usage


def test_completions_default_to_16_tokens_and_the_given_budget_is_remembered():
    p = parse_completion({"model": "m", "prompt": "x"})
    assert p.prompts[0].sampling.max_tokens == 16 and p.max_tokens is None
    given = parse_completion({"model": "m", "prompt": "x", "max_tokens": 100})
    assert given.prompts[0].sampling.max_tokens == 100 and given.max_tokens == 100
    chat = parse_chat({**CHAT, "max_completion_tokens": 7})
    assert (chat.max_tokens, chat.max_tokens_param) == (7, "max_completion_tokens")
    assert not parse_chat(CHAT).prompts[0].sampling.HasField("max_tokens")  # chat: up to the context
    with pytest.raises(ApiError, match="scores") as err:
        parse_completion({"model": "m", "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert err.value.param == "max_tokens"


@pytest.mark.parametrize("field,chat,param", [
    ("sampling.max_tokens", True, "max_completion_tokens"), ("sampling.max_tokens", False, "max_tokens"),
    ("sampling.logit_bias", True, "logit_bias"), ("sampling.stop_token_ids", False, "stop_token_ids"),
    ("sampling.stop[0]", False, "stop"), ("sampling.structured_output", True, "response_format"),
    ("chat.messages[2].tool_calls_json", True, "messages[2].tool_calls"),
    ("chat.messages[1].parts[0].media", True, "messages[1].content[0]"),
    ("chat.template_kwargs_json", True, "chat_template_kwargs"), ("token_ids.ids", False, "prompt"),
    ("text", False, "prompt"), ("chat.messages", True, "messages"),
])
def test_backend_errors_name_the_openai_parameter_with_an_openai_code(field, chat, param):
    from qwenpd.errors import InvalidArgument

    p = parse_chat({**CHAT, "max_completion_tokens": 5}) if chat else parse_completion({"model": "m", "prompt": "x"})
    err = api_error(InvalidArgument(field, "bad"), p)
    assert (err.status, err.param, err.code) == (400, param, None)
    assert "sampling." not in err.message and "_json" not in err.message
    limit = api_error(InvalidArgument("sampling.max_tokens", "too many", reason="MAX_TOKENS_TOO_LARGE"), p)
    assert limit.code == "max_tokens_too_large"


def test_a_prompt_over_the_context_is_openais_context_length_exceeded():
    from qwenpd.errors import InvalidArgument

    chat = parse_chat({**CHAT, "max_tokens": 100})
    err = api_error(InvalidArgument("chat.messages", "the prompt has more than 8192 tokens",
                                    reason="PROMPT_TOO_LONG"), chat, 8192)
    assert (err.status, err.param, err.code) == (400, "messages", "context_length_exceeded")
    assert err.message.startswith("This model's maximum context length is 8192 tokens. However, your messages")
    with pytest.raises(ApiError) as over:
        check_context(chat, 8190, 8192)
    assert (over.value.param, over.value.code) == ("messages", "context_length_exceeded")
    assert "you requested 8290 tokens (8190 in the messages, 100 in the completion)" in over.value.message
    check_context(parse_chat(CHAT), 8190, 8192)  # no max_tokens given: cut short at the context's end
    with pytest.raises(ApiError) as alone:
        check_context(parse_completion({"model": "m", "prompt": "x"}), 9000, 8192)
    assert alone.value.param == "prompt" and "your prompt resulted in 9000 tokens" in alone.value.message
