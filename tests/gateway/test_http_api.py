"""The HTTP API's answers, whole and streamed, over a stand-in for the backends that streams a given output
(gateway/http.py with gateway/openai.py): cut-off tool calls, stream deltas, context limits, logprob offsets,
the bearer scheme and the models list."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from qwenpd.clients.dispatch import Chunk
from qwenpd.errors import InvalidArgument
from qwenpd.gateway.config import GatewayConfig
from qwenpd.gateway.core import Choice
from qwenpd.gateway.http import HttpApi
from qwenpd.gateway.metrics import GatewayMetrics
from qwenpd.protos.qwenpd.v1 import prefill_pb2
from qwenpd.security import Security

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


class Backends:
    """What HttpApi needs of the Gateway: a model that writes `output` in `size`-character chunks, one token
    each, and ends with `finish`; `refuse`: prefill's error instead."""

    def __init__(self, output: str, finish: str = "stop", size: int = 3, prompt_tokens: int = 5,
                 refuse: Exception | None = None, **config):
        self.config = GatewayConfig(prefill=("127.0.0.1:1",), decode=("127.0.0.1:2",), http_listen="127.0.0.1:0",
                                    **config)
        self.metrics = GatewayMetrics()
        self.model_info = prefill_pb2.ModelInfo(model_name="m", max_context=8192)
        self.model_names = ("m",)
        self.output, self.finish, self.size, self.prompt_tokens, self.refuse = output, finish, size, \
            prompt_tokens, refuse
        self.calls = 0
        self.dispatcher = SimpleNamespace(prefill_pool=SimpleNamespace(up_count=lambda: 1),
                                          decode_pool=SimpleNamespace(up_count=lambda: 1))

    async def get_model_info(self, timeout):
        return self.model_info

    async def choices(self, request, n, timeout):
        self.calls += 1
        if self.refuse is not None:
            raise self.refuse
        choice = Choice(0)
        choice.trace.prefill = prefill_pb2.PrefillResponse(prompt_tokens=self.prompt_tokens)
        pieces = [self.output[i:i + self.size] for i in range(0, len(self.output), self.size)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            yield choice, Chunk([k], piece, [-0.5], self.finish if last else None, token_bytes=[piece.encode()])
            await asyncio.sleep(0)


def _post(backends: Backends, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=HttpApi(backends).app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            if body is None:
                return await http.get(path, headers=headers)
            return await http.post(path, json=body, headers=headers)
    return asyncio.run(run())


def _events(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _streamed_chat(events: list[dict]) -> tuple[str, list[tuple[str, str]], str | None]:
    """Content, (name, arguments) per call, and the finish reason of a streamed chat answer; every event has at
    most one tool-call entry per index (OpenAI's shape)."""
    content, names, args, finish = "", {}, {}, None
    for e in events:
        for c in e["choices"]:
            content += c["delta"].get("content") or ""
            indexes = [t["index"] for t in c["delta"].get("tool_calls", [])]
            assert len(indexes) == len(set(indexes)), c["delta"]
            for t in c["delta"].get("tool_calls", []):
                if "id" in t:
                    names[t["index"]] = t["function"]["name"]
                args[t["index"]] = args.get(t["index"], "") + t["function"]["arguments"]
            finish = c["finish_reason"] or finish
    return content, [(names[i], args[i]) for i in sorted(args)], finish


@pytest.mark.parametrize("output,calls", [
    ("<tool_call>\n<function=get_weather>\n<param", [("get_weather", {})]),
    (CALL + "\n" + CALL + "\n<tool_call>\n<function", [("get_weather", {"city": "Paris"})] * 2),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3",
     [("get_weather", {"city": "Paris"})]),
], ids=["inside-the-first-parameter", "after-two-calls", "inside-the-second-parameter"])
def test_a_call_cut_off_by_the_length_limit_is_a_call_never_content(output, calls):
    """Whole and streamed alike: the cut-off call with the parameters written in full (or dropped where even its
    name is cut), content null / empty, finish_reason "length"."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Paris?"}], "tools": WEATHER, "max_tokens": 30}
    for size in (1, 4, len(output)):
        whole = _post(Backends(output, "length", size), "/v1/chat/completions", body).json()["choices"][0]
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]]
        assert got == calls and whole["message"]["content"] is None and whole["finish_reason"] == "length"
        content, streamed, finish = _streamed_chat(_events(_post(Backends(output, "length", size),
                                                                 "/v1/chat/completions", {**body, "stream": True})))
        assert content == "" and finish == "length"
        assert [(name, json.loads(args)) for name, args in streamed] == calls


def test_streamed_tool_calls_send_one_entry_per_index_in_a_chunk():
    body = {"model": "m", "messages": [{"role": "user", "content": "Paris?"}], "tools": WEATHER, "stream": True}
    events = _events(_post(Backends(CALL + CALL, size=len(CALL) * 2), "/v1/chat/completions", body))
    entries = [t for e in events for c in e["choices"] for t in c["delta"].get("tool_calls", [])]
    assert [t["index"] for t in entries] == [0, 1] and all(t["id"] for t in entries)
    assert [json.loads(t["function"]["arguments"]) for t in entries] == [{"city": "Paris"}] * 2
    assert all("system_fingerprint" in e for e in events)  # as the whole answer's


def test_a_reasoning_only_answer_has_null_content():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    message = _post(Backends("<think>hmm, still thinking"), "/v1/chat/completions", body).json()["choices"][0]
    assert message["message"]["content"] is None and message["message"]["reasoning_content"] == "hmm, still thinking"


def test_prompt_and_given_max_tokens_over_the_context_are_a_400_as_openais():
    over = {"model": "m", "prompt": list(range(8190)), "max_tokens": 100}
    backends = Backends("x")
    for body in (over, {**over, "stream": True}):
        r = _post(backends, "/v1/completions", body)
        err = r.json()["error"]
        assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
        assert "maximum context length is 8192 tokens. However, you requested 8290 tokens (8190 in the prompt, " \
            "100 in the completion)" in err["message"]
    assert backends.calls == 0  # token ids: refused before any backend sees them
    assert _post(backends, "/v1/completions", {"model": "m", "prompt": list(range(8190))}).status_code == 200
    chat = {"model": "m", "messages": [{"role": "user", "content": "long"}], "max_completion_tokens": 100}
    for body in (chat, {**chat, "stream": True}):  # text: prefill counts the prompt's tokens
        r = _post(Backends("x", prompt_tokens=8190), "/v1/chat/completions", body)
        err = r.json()["error"]
        assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    refused = Backends("x", refuse=InvalidArgument("chat.messages", "the prompt has more than 8192 tokens, the "
                                                   "most this server takes", reason="PROMPT_TOO_LONG"))
    err = _post(refused, "/v1/chat/completions", chat).json()["error"]
    assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    assert err["message"].startswith("This model's maximum context length is 8192 tokens. However, your messages")


def test_backend_errors_name_the_parameter_the_caller_sent():
    refused = Backends("x", refuse=InvalidArgument("sampling.max_tokens", "more than this service's limit",
                                                   reason="MAX_TOKENS_TOO_LARGE"))
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9000}
    err = _post(refused, "/v1/chat/completions", chat).json()["error"]
    assert (err["param"], err["code"]) == ("max_completion_tokens", "max_tokens_too_large")
    refused.refuse = InvalidArgument("chat.messages[0].tool_calls_json", "not JSON")
    err = _post(refused, "/v1/chat/completions", {**chat, "stream": True}).json()["error"]
    assert (err["param"], err["code"]) == ("messages[0].tool_calls", None)


def test_streamed_text_offsets_count_from_the_start_of_the_whole_text():
    body = {"model": "m", "prompt": "Say", "max_tokens": 9, "logprobs": 0}
    output = "Hello, world and more"
    whole = _post(Backends(output, size=4), "/v1/completions", body).json()["choices"][0]["logprobs"]
    events = _events(_post(Backends(output, size=4), "/v1/completions", {**body, "stream": True}))
    offsets = [o for e in events for c in e["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == whole["text_offset"] == list(range(0, len(output), 4))
    echoed = _events(_post(Backends(output, size=4), "/v1/completions", {**body, "stream": True, "echo": True}))
    offsets = [o for e in echoed[1:] for c in e["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == [len("Say") + o for o in range(0, len(output), 4)]


def test_the_bearer_scheme_is_case_insensitive_and_models_have_a_creation_time(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    backends = Backends("x", security=Security(auth_token_file=str(token)))
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = _post(backends, "/v1/models", None, {"Authorization": f"{scheme} s3cret"})
        assert r.status_code == 200 and r.json()["data"][0]["created"] > 1_600_000_000
    for wrong in ("Bearer s3cre", "Basic s3cret", "s3cret", "Bearer"):
        assert _post(backends, "/v1/models", None, {"Authorization": wrong}).status_code == 401
