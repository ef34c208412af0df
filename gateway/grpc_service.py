"""The GenerateService servicer: a GenerateRequest in, the stream of one completion out."""

from __future__ import annotations

import json
from typing import Any

from qwenpd.clients.chat_output import ChatOutput
from qwenpd.clients.dispatch import FINISH_NAMES, Trace
from qwenpd.errors import InvalidArgument
from qwenpd.gateway.core import Gateway, usage
from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc, prefill_pb2

_FINISH = {name: value for value, name in FINISH_NAMES.items()}


def prefill_request(request: generate_pb2.GenerateRequest) -> prefill_pb2.PrefillRequest:
    """The PrefillRequest of a GenerateRequest (same prompt, sampling and salt)."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt", "give the prompt as text, token_ids or chat")
    out = prefill_pb2.PrefillRequest(request_id=request.request_id, sampling=request.sampling)
    if kind == "text":
        out.text = request.text
    else:
        getattr(out, kind).CopyFrom(getattr(request, kind))
    if request.HasField("cache_salt"):
        out.cache_salt = request.cache_salt
    out.media.extend(request.media)
    return out


def with_template_defaults(request: prefill_pb2.PrefillRequest, defaults: dict[str, Any]) -> None:
    """The server's default chat template arguments under a chat request's own (in place)."""
    if not defaults or request.WhichOneof("prompt") != "chat":
        return
    chat = request.chat
    if "enable_thinking" in defaults and not chat.HasField("enable_thinking"):
        chat.enable_thinking = bool(defaults["enable_thinking"])
    others = {k: v for k, v in defaults.items() if k != "enable_thinking"}
    if others:
        given = json.loads(chat.template_kwargs_json) if chat.template_kwargs_json else {}
        chat.template_kwargs_json = json.dumps({**others, **(given if isinstance(given, dict) else {})})


def _chat_output(request: prefill_pb2.PrefillRequest, trace: Trace) -> ChatOutput:
    """The parser of a chat completion: reasoning (when the template opened it), tool calls (when tools were
    offered; their markup is text otherwise)."""
    tools = json.loads(request.chat.tools_json) if request.chat.tools_json else []
    return ChatOutput(tools, thinking_open=trace.reasoning_open, calls=bool(tools))


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def Generate(self, request: generate_pb2.GenerateRequest, context):
        pre = prefill_request(request)
        with_template_defaults(pre, self.gateway.config.template_defaults or {})
        trace = Trace()
        first = True
        output: ChatOutput | None = None
        called = False
        async for chunk in self.gateway.stream(pre, self.gateway.timeout(context.time_remaining()), trace):
            out = generate_pb2.GenerateChunk(token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs)
            out.top_logprobs.extend(common_pb2.TopLogprobs(candidates=[
                common_pb2.TopLogprob(id=i, logprob=lp, text=t, bytes=b) for i, lp, t, b in top])
                for top in chunk.top_logprobs)
            out.token_bytes.extend(chunk.token_bytes)
            if first:
                out.request_id = pre.request_id
                first = False
                if pre.WhichOneof("prompt") == "chat":  # parsed into content, reasoning and tool calls
                    output = _chat_output(pre, trace)
            finish = chunk.finish_reason
            if output is not None:
                delta = output.push(chunk.text)
                if finish is not None:
                    tail = output.finish()
                    delta.content, delta.reasoning = delta.content + tail.content, delta.reasoning + tail.reasoning
                    delta.tool_calls += tail.tool_calls
                out.content, out.reasoning = delta.content, delta.reasoning
                out.tool_calls.extend(generate_pb2.ToolCallDelta(index=t.index, id=t.id or "", name=t.name or "",
                                                                 arguments=t.arguments) for t in delta.tool_calls)
                called = called or bool(delta.tool_calls)
                if called and finish == "stop":
                    finish = "tool_calls"
            if finish is not None:
                out.finish_reason = _FINISH[finish]
                out.usage.CopyFrom(usage(trace))
                out.timings.CopyFrom(generate_pb2.GenerateTimings(
                    ttft_ns=int(trace.ttft_s * 1e9), decode_ns=int(trace.decode_s * 1e9),
                    tpot_ns=int(trace.tpot_s * 1e9), resumes=trace.resumes))
            yield out

    async def GetModelInfo(self, request: prefill_pb2.GetModelInfoRequest, context) -> prefill_pb2.ModelInfo:
        info = prefill_pb2.ModelInfo()
        info.CopyFrom(await self.gateway.get_model_info(self.gateway.timeout(context.time_remaining())))
        info.model_name = self.gateway.model_name
        return info
