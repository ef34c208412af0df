"""Python clients: `AsyncClient` (asyncio) and `Client` (blocking) with one surface.

    with Client(prefill="127.0.0.1:50051", decode="127.0.0.1:50052", timeout=60) as c:
        r = c.generate("Hello", max_tokens=32, temperature=0)
        for chunk in c.stream("Hello", max_tokens=32):
            print(chunk.text, end="")

Both do Prefill (the prompt becomes a checkpoint and a first token) then Decode (a token stream). Every call
has a deadline. Failures raise one exception class per status code (clients.errors), mapped in one function.
With several addresses per service, each request goes to the least-loaded one (clients.routing).

Crash recovery: when a decode stream breaks off (UNAVAILABLE: the service died or is shutting down), the client
re-prefills prompt + the tokens it already received and continues on the best decode address, with the same
seeded random stream, budget and stop-string state: one uninterrupted output, identical to a run without the
failure. That logic (clients.dispatch.Dispatcher) is shared with the gateway.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from qwenpd.clients.chat_output import ChatOutput
from qwenpd.clients.chat_request import chat_message, response_format_spec, set_template_kwargs, tool_choice_spec
from qwenpd.clients.dispatch import Chunk, Dispatcher, Trace, resumable, unary
from qwenpd.clients.routing import BackendPool
from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, prefill_pb2, prefill_pb2_grpc
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.security import KEEPALIVE_OPTIONS, Security
from qwenpd.security import channel as secure_channel

DEFAULT_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Result:
    """A whole generation. ttft_s: call start -> first token at the client (the prefill response carries it);
    tpot_s: time per output token = (last token received - first token) / (tokens - 1), over tokens, not chunks
    (clients.dispatch.Trace). prefill_s = ttft_s; decode_s: first token -> last."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    tpot_s: float
    logprobs: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    request_id: str = ""
    # chat prompts: `text` parsed (clients.chat_output): the answer, the reasoning, and the tool calls in OpenAI's
    # shape ({"id", "type", "function": {"name", "arguments"}}) when tools were offered
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    image_tokens: int = 0  # prompt tokens that stand for images and video frames
    encoder_s: float = 0.0  # the vision tower's share of prefill (0: no images, or all cached)


def build_prefill_request(prompt: str | None, token_ids: Sequence[int] | None,
                          messages: Sequence[dict[str, str]] | None, *, max_tokens: int | None,
                          temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
                          stop: Sequence[str] | str | None, stop_token_ids: Sequence[int] | None,
                          ignore_eos: bool, cache_salt: str | None, request_id: str, min_p: float = 0.0,
                          logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          repetition_penalty: float = 1.0, tools: Sequence[dict[str, Any]] | None = None,
                          chat_template_kwargs: dict[str, Any] | None = None, tool_choice: Any = None,
                          parallel_tool_calls: bool = True, response_format: dict[str, Any] | None = None,
                          speculative: bool | None = None, images: Sequence[bytes] | None = None
                          ) -> prefill_pb2.PrefillRequest:
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, token_ids, messages")
    sampling = common_pb2.SamplingParams(top_k=top_k or 0, ignore_eos=ignore_eos,
                                         stop=[stop] if isinstance(stop, str) else list(stop or ()),
                                         stop_token_ids=list(stop_token_ids or ()), min_p=min_p,
                                         logit_bias=dict(logit_bias or {}), min_tokens=min_tokens,
                                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    if repetition_penalty != 1.0:
        sampling.repetition_penalty = repetition_penalty
    if speculative is not None:
        sampling.speculative = speculative
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("max_tokens", max_tokens)):
        if value is not None:
            setattr(sampling, name, value)
    req = prefill_pb2.PrefillRequest(request_id=request_id, sampling=sampling)
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.chat.messages.extend(chat_message(m, i) for i, m in enumerate(messages or ()))
        offered, forced = tool_choice_spec(list(tools or ()), tool_choice, parallel_tool_calls)
        if offered:
            req.chat.tools_json = json.dumps(offered)
        set_template_kwargs(req.chat, chat_template_kwargs or {})
        req.sampling.structured_output = forced
    if messages is None and (tools or chat_template_kwargs or tool_choice is not None):
        raise ValueError("tools, tool_choice and chat_template_kwargs need a chat prompt (messages)")
    fmt = response_format_spec(response_format)
    if fmt and req.sampling.structured_output:
        raise ValueError("response_format cannot be combined with tool_choice 'required' or a named function")
    req.sampling.structured_output = fmt or req.sampling.structured_output
    if cache_salt is not None:
        req.cache_salt = cache_salt
    if images:
        if messages is not None:
            raise ValueError("a chat prompt carries its images in its messages' content parts, not images=")
        req.media.extend(common_pb2.Media(image=bytes(img)) for img in images)
    return resumable(req)


class AsyncClient:
    """asyncio client. Use `async with AsyncClient(...) as c:`; channels open on first use in the running loop."""

    def __init__(self, prefill: str | Sequence[str], decode: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                 *, security: Security | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        """security: TLS (tls_ca; tls_cert/tls_key for mutual TLS) and the bearer token sent on every call.
        max_message_bytes: largest message sent or received (the servers have their own limit)."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self._security = security
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes), *KEEPALIVE_OPTIONS]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.dispatcher = Dispatcher(BackendPool(prefill if isinstance(prefill, str) else list(prefill), "prefill"),
                                     BackendPool(decode if isinstance(decode, str) else list(decode), "decode"),
                                     self._channel)

    # resume policy (clients.dispatch.Dispatcher): how often, how long to wait for a decode address
    @property
    def resumed(self) -> int:
        """Streams this client continued after a decode failure."""
        return self.dispatcher.resumed

    @property
    def resume_wait_s(self) -> float:
        return self.dispatcher.resume_wait_s

    @resume_wait_s.setter
    def resume_wait_s(self, value: float) -> None:
        self.dispatcher.resume_wait_s = value

    # ---- public surface ------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                       messages: Sequence[dict[str, str]] | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: Sequence[str] | str | None = None,
                       stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                       cache_salt: str | None = None, request_id: str = "", timeout: float | None = None,
                       min_p: float = 0.0, logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
                       presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                       repetition_penalty: float = 1.0, tools: Sequence[dict[str, Any]] | None = None,
                       chat_template_kwargs: dict[str, Any] | None = None,
                       tool_choice: Any = None, parallel_tool_calls: bool = True,
                       response_format: dict[str, Any] | None = None, speculative: bool | None = None,
                       images: Sequence[bytes] | None = None) -> Result:
        """Prefill then decode to the end. Give exactly one of prompt (text), token_ids, messages (chat, rendered
        by the model's template). Sampling options left None take the server's defaults (temperature 1, top_p 1,
        max_tokens the server's); temperature 0 is greedy; min_p drops tokens less likely than min_p times the most
        likely; logit_bias adds to token ids' logits; min_tokens holds EOS and stop ids back; presence_penalty and
        frequency_penalty are OpenAI's, repetition_penalty transformers'/vLLM's. Chat prompts (messages, OpenAI-style:
        assistant tool_calls and tool results included) may offer `tools` (with OpenAI's `tool_choice`: "required" or a named function constrains the
        answer to calls, `parallel_tool_calls`) and pass `chat_template_kwargs`; their Result has the text parsed
        into content, reasoning and tool_calls. `response_format` as OpenAI's (json_object, json_schema) constrains
        the output to JSON. `speculative=False` decodes this request without MTP drafts where the services run them
        (True where they run none is refused). Images: a text or token_ids prompt takes `images` (encoded image
        bytes, one per <|image_pad|> placeholder in the prompt, in order); a chat message takes them as content
        parts ({"type": "image", "image": bytes}, or OpenAI's {"type": "image_url", "image_url": {"url":
        "data:..."}}). `timeout` bounds each of the two calls (default: the client's)."""
        request = build_prefill_request(prompt, token_ids, messages, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                        ignore_eos=ignore_eos, cache_salt=cache_salt, request_id=request_id,
                                        min_p=min_p, logit_bias=logit_bias, min_tokens=min_tokens,
                                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                        repetition_penalty=repetition_penalty, tools=tools,
                                        chat_template_kwargs=chat_template_kwargs,
                                        tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                                        response_format=response_format, speculative=speculative, images=images)
        trace = Trace()
        ids: list[int] = []
        logprobs: list[float] = []
        text: list[str] = []
        reason = None
        async for chunk in self.dispatcher.run(trace, request, timeout or self.timeout):
            ids += chunk.token_ids
            logprobs += chunk.logprobs
            text.append(chunk.text)
            reason = chunk.finish_reason or reason
        result = _result(trace, ids, "".join(text), reason, logprobs)
        if messages is None:
            result.content = result.text
            return result
        parsed = ChatOutput.parse(result.text, tools or (), trace.reasoning_open, calls=bool(tools))
        result.content, result.reasoning = parsed.content, parsed.reasoning
        result.tool_calls = [c.to_openai() for c in parsed.tool_calls]
        if result.tool_calls and result.finish_reason == "stop":
            result.finish_reason = "tool_calls"
        return result

    async def stream(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                     messages: Sequence[dict[str, str]] | None = None, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, stop: Sequence[str] | str | None = None,
                     stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                     cache_salt: str | None = None, request_id: str = "", timeout: float | None = None,
                     min_p: float = 0.0, logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     repetition_penalty: float = 1.0, tools: Sequence[dict[str, Any]] | None = None,
                     chat_template_kwargs: dict[str, Any] | None = None,
                     tool_choice: Any = None, parallel_tool_calls: bool = True,
                     response_format: dict[str, Any] | None = None, speculative: bool | None = None,
                     images: Sequence[bytes] | None = None) -> AsyncIterator[Chunk]:
        """Prefill then yield Decode's chunks as they arrive (the first holds the first token); options as for
        `generate` (the raw text: parse a chat's with clients.chat_output.ChatOutput). Leaving the loop early cancels
        the decode call, which frees its batch slot."""
        request = build_prefill_request(prompt, token_ids, messages, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                        ignore_eos=ignore_eos, cache_salt=cache_salt, request_id=request_id,
                                        min_p=min_p, logit_bias=logit_bias, min_tokens=min_tokens,
                                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                        repetition_penalty=repetition_penalty, tools=tools,
                                        chat_template_kwargs=chat_template_kwargs,
                                        tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                                        response_format=response_format, speculative=speculative, images=images)
        async for chunk in self.dispatcher.run(Trace(), request, timeout or self.timeout):
            yield chunk

    async def model_info(self, timeout: float | None = None) -> prefill_pb2.ModelInfo:
        backend = self.dispatcher.prefill_pool.ranked()[0]
        stub = prefill_pb2_grpc.PrefillServiceStub(self._channel(backend.address))
        return await unary(stub.GetModelInfo(prefill_pb2.GetModelInfoRequest(), timeout=timeout or self.timeout))

    async def load(self, address: str | None = None, timeout: float | None = None) -> decode_pb2.Load:
        return await self.dispatcher.load(address or self.dispatcher.decode_pool.backends[0].address,
                                          timeout or self.timeout)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = secure_channel(address, self._security, self._options, aio=True)
        return ch


def _result(trace: Trace, ids: list[int], text: str, reason: str | None, logprobs: list[float]) -> Result:
    pre = trace.prefill
    assert pre is not None and trace.first_token_at is not None
    usage = trace.usage
    return Result(token_ids=ids, text=text, finish_reason=reason,
                  prompt_tokens=usage.prompt_tokens if usage else pre.prompt_tokens,
                  cached_tokens=usage.cached_tokens if usage else pre.cached_tokens, ttft_s=trace.ttft_s,
                  tpot_s=trace.tpot_s, logprobs=logprobs, prefill_s=trace.ttft_s, decode_s=trace.decode_s,
                  request_id=pre.request_id, image_tokens=pre.image_tokens,
                  encoder_s=pre.timings.encoder_ns / 1e9)


class Client:
    """Blocking client with AsyncClient's surface; runs its own event loop on a background thread."""

    def __init__(self, prefill: str | Sequence[str], decode: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                 **options: Any):
        self._async = AsyncClient(prefill, decode, timeout, **options)  # security=, max_message_bytes=
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwenpd-client", daemon=True)
        self._thread.start()

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """AsyncClient.generate, blocking."""
        return self._wait(self._async.generate(prompt, **kwargs))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[Chunk]:
        """AsyncClient.stream as a plain iterator; closing it early cancels the decode call."""
        agen = self._async.stream(prompt, **kwargs)
        try:
            while True:
                try:
                    yield self._wait(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._wait(agen.aclose())  # cancels the decode call if the caller stopped early

    @property
    def resumed(self) -> int:
        """Streams continued after a decode failure (AsyncClient.resumed)."""
        return self._async.resumed

    @property
    def resume_wait_s(self) -> float:
        """How long a broken stream waits for some decode address to answer (AsyncClient.resume_wait_s)."""
        return self._async.resume_wait_s

    @resume_wait_s.setter
    def resume_wait_s(self, value: float) -> None:
        self._async.resume_wait_s = value

    def model_info(self, timeout: float | None = None) -> prefill_pb2.ModelInfo:
        return self._wait(self._async.model_info(timeout))

    def load(self, address: str | None = None, timeout: float | None = None) -> decode_pb2.Load:
        return self._wait(self._async.load(address, timeout))

    def close(self) -> None:
        if self._loop.is_running():
            self._wait(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
