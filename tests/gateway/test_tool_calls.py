"""Tool calls over the HTTP API (issue 24: tool_choice auto/none parsed, required/named constrained): the gateway's real HTTP app over a
stand-in for the backends that streams a hand-written Qwen3.6 output, through the official openai SDK."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from qwenpd.clients.dispatch import Chunk
from qwenpd.gateway.config import GatewayConfig
from qwenpd.gateway.core import Choice, collect
from qwenpd.gateway.http import HttpApi
from qwenpd.gateway.metrics import GatewayMetrics
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
OUTPUT = ("<think>\nThe user wants the weather.\n</think>\n\nLet me check.\n<tool_call>\n<function=get_weather>\n"
          "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
          "<tool_call>\n<function=get_time>\n</function>\n</tool_call>")


class Backends:
    """What HttpApi needs of the Gateway, with a model that writes OUTPUT in small chunks."""

    def __init__(self):
        self.config = GatewayConfig(prefill=("127.0.0.1:1",), decode=("127.0.0.1:2",), http_listen="127.0.0.1:0")
        self.metrics = GatewayMetrics()
        self.model_info = prefill_pb2.ModelInfo(model_name="m", max_context=4096)
        self.model_names = ("m",)
        self.requests: list[prefill_pb2.PrefillRequest] = []
        self.dispatcher = SimpleNamespace(prefill_pool=SimpleNamespace(up_count=lambda: 1),
                                          decode_pool=SimpleNamespace(up_count=lambda: 1))

    async def get_model_info(self, timeout):
        return self.model_info

    async def choices(self, request, n, timeout):
        self.requests.append(request)
        choice = Choice(0)
        choice.trace.prefill = prefill_pb2.PrefillResponse(prompt_tokens=5)
        choice.trace.first_token_at = choice.trace.last_token_at = 0.0
        pieces = [OUTPUT[i:i + 7] for i in range(0, len(OUTPUT), 7)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            chunk = Chunk([k], piece, [-0.5], "stop" if last else None)
            choice.trace.tokens += 1
            yield choice, chunk
            await asyncio.sleep(0)


@pytest.fixture
def client():
    backends = Backends()
    transport = httpx.ASGITransport(app=HttpApi(backends).app)
    http = httpx.AsyncClient(transport=transport, base_url="http://gw/v1")
    yield backends, openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)


def test_tool_calls_whole_and_streamed_through_the_openai_sdk(client):
    backends, oai = client

    async def run():
        whole = await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Paris?"}],
                                                  tools=TOOLS)
        stream = await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Paris?"}],
                                                   tools=TOOLS, stream=True)
        events = [e async for e in stream]
        single = await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Paris?"}],
                                                   tools=TOOLS, parallel_tool_calls=False)
        none = await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=TOOLS, tool_choice="none")
        return whole, events, single, none

    whole, events, single, none = asyncio.run(run())
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]
    assert all(c.id and c.type == "function" for c in calls)
    assert choice.message.content == "Let me check.\n" and "<tool_call>" not in choice.message.content
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather.\n"
    # streamed: the same calls, assembled from OpenAI-shaped deltas; no markup in content
    content, args, names, ids, finish = "", {}, {}, {}, None
    for e in events:
        for c in e.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                if t.id:
                    ids[t.index], names[t.index] = t.id, t.function.name
                args[t.index] = args.get(t.index, "") + (t.function.arguments or "")
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content == "Let me check.\n"
    assert [(names[i], json.loads(args[i])) for i in sorted(args)] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert [c.function.name for c in single.choices[0].message.tool_calls] == ["get_weather"]
    # tool_choice none: the model is not told of the tools, and what it writes is text
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content
    offered = [json.loads(r.chat.tools_json) if r.chat.tools_json else [] for r in backends.requests]
    assert offered == [TOOLS, TOOLS, TOOLS, []]


def test_tool_results_and_assistant_calls_reach_prefill_and_refusals_name_the_parameter(client):
    backends, oai = client
    messages = [{"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]

    async def run():
        await oai.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        await oai.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="required")
        await oai.chat.completions.create(model="m", messages=messages, tools=TOOLS, parallel_tool_calls=False,
                                          tool_choice={"type": "function", "function": {"name": "get_time"}})
        with pytest.raises(openai.BadRequestError) as unknown:
            await oai.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                              tool_choice={"type": "function", "function": {"name": "nope"}})
        with pytest.raises(openai.BadRequestError) as both:
            await oai.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="required",
                                              response_format={"type": "json_object"})
        with pytest.raises(openai.BadRequestError) as bad:
            await oai.chat.completions.create(model="m", messages=messages, tools=[{"type": "function"}])
        return unknown.value, both.value, bad.value

    unknown, both, bad = asyncio.run(run())
    sent = backends.requests[0].chat.messages
    assert json.loads(sent[1].tool_calls_json)[0]["function"]["name"] == "get_weather"
    assert (sent[2].role, sent[2].tool_call_id, sent[2].content) == ("tool", "c1", "sunny")
    assert not backends.requests[0].sampling.structured_output  # auto: free text, calls parsed
    required, named = (json.loads(r.sampling.structured_output) for r in backends.requests[1:3])
    assert required["type"] == named["type"] == "lark"
    assert "<function=get_weather>" in required["grammar"] and "<function=get_time>" in required["grammar"]
    assert "<function=get_weather>" not in named["grammar"] and '("\\n" call)*' not in named["grammar"]
    assert unknown.body["param"] == "tool_choice" and both.body["param"] == "response_format"
    assert bad.body["param"] == "tools[0]"


def test_the_embedded_template_renders_tools_calls_and_results(tiny_model_dir):
    """The tiny model's chat template speaks Qwen3.6's format, so the services exercise the real path."""
    from qwenpd.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
         {"role": "tool", "content": "sunny"}], tools=TOOLS, enable_thinking=True)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n<think>\n")
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert plain == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_grpc_generate_parses_chat_output_for_callers_in_any_language():
    """GenerateChunk carries the chat output parsed (content, reasoning, tool-call pieces) beside the raw text,
    and the last chunk says FINISH_REASON_TOOL_CALLS when the model called tools."""
    from qwenpd.gateway.grpc_service import GenerateServicer
    from qwenpd.protos.qwenpd.v1 import generate_pb2

    class Gateway(Backends):
        def timeout(self, remaining):
            return 60.0

        async def stream(self, request, timeout, trace):
            async for choice, chunk in self.choices(request, 1, timeout):
                trace.prefill = choice.trace.prefill
                yield chunk

    request = generate_pb2.GenerateRequest(chat=prefill_pb2.Chat(
        messages=[common_pb2.ChatMessage(role="user", content="Paris?")], tools_json=json.dumps(TOOLS)))
    context = SimpleNamespace(time_remaining=lambda: None)

    async def run():
        return [c async for c in GenerateServicer(Gateway()).Generate(request, context)]

    chunks = asyncio.run(run())
    assert "".join(c.text for c in chunks) == OUTPUT  # the raw text, as before
    assert "".join(c.content for c in chunks) == "Let me check.\n"
    assert "".join(c.reasoning for c in chunks) == "The user wants the weather.\n"
    pieces = [t for c in chunks for t in c.tool_calls]
    assert [(p.index, p.name) for p in pieces if p.id] == [(0, "get_weather"), (1, "get_time")]
    args = {i: "".join(p.arguments for p in pieces if p.index == i) for i in (0, 1)}
    assert json.loads(args[0]) == {"city": "Paris", "days": 2} and json.loads(args[1]) == {}
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
