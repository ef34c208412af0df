"""Python clients: `AsyncClient` (asyncio) and `Client` (blocking) with one surface.

    with Client(prefill="127.0.0.1:50051", decode="127.0.0.1:50052", timeout=60) as c:
        r = c.generate("Hello", max_tokens=32, temperature=0)
        for chunk in c.stream("Hello", max_tokens=32):
            print(chunk.text, end="")

Both do Prefill (the prompt becomes a checkpoint and a first token) then Decode (a token stream). Every call
has a deadline. Failures raise one exception class per status code (clients.errors), mapped in one function.
With several addresses per service, each request goes to the least-loaded one (clients.routing).

Crash recovery: when a decode stream breaks off (UNAVAILABLE: the service died or is shutting down), the client
re-prefills prompt + the tokens it already received with `resume_generated` set, and continues on the best
decode address. Prefill continues the same seeded random stream (the client always sends a seed), budget and
stop-string state, so the caller sees one uninterrupted output, identical to a run without the failure.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from qwenpd.clients.errors import QwenpdError, Unavailable, from_rpc_error
from qwenpd.clients.routing import Backend, Pool
from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.security import Security
from qwenpd.security import channel as secure_channel

DEFAULT_TIMEOUT_S = 60.0
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error"}


@dataclass(slots=True)
class Chunk:
    """A piece of streamed output. `finish_reason` ("stop", "length", ...) only on the last chunk."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None = None


@dataclass(slots=True)
class Result:
    """A whole generation. ttft_s: call start -> first token at the client (the prefill response carries it);
    tpot_s: mean time per later token. prefill_s = ttft_s; decode_s: first token -> last."""

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


@dataclass(slots=True)
class _Trace:
    """Filled in while a request runs, for Result."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prefill: prefill_pb2.PrefillResponse | None = None
    usage: common_pb2.Usage | None = None


def build_prefill_request(prompt: str | None, token_ids: Sequence[int] | None,
                          messages: Sequence[dict[str, str]] | None, *, max_tokens: int | None,
                          temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
                          stop: Sequence[str] | str | None, stop_token_ids: Sequence[int] | None,
                          ignore_eos: bool, cache_salt: str | None, request_id: str) -> prefill_pb2.PrefillRequest:
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, token_ids, messages")
    sampling = common_pb2.SamplingParams(top_k=top_k or 0, ignore_eos=ignore_eos,
                                         stop=[stop] if isinstance(stop, str) else list(stop or ()),
                                         stop_token_ids=list(stop_token_ids or ()))
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("max_tokens", max_tokens)):
        if value is not None:
            setattr(sampling, name, value)
    if seed is None:  # chosen here, not by prefill, so that a resumed request continues the same random stream
        sampling.seed = secrets.randbits(63)
    req = prefill_pb2.PrefillRequest(request_id=request_id, sampling=sampling, return_prompt_token_ids=True)
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.chat.messages.extend(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ())
    if cache_salt is not None:
        req.cache_salt = cache_salt
    return req


class AsyncClient:
    """asyncio client. Use `async with AsyncClient(...) as c:`; channels open on first use in the running loop."""

    max_resumes = 3  # re-prefill and continue at most this often per request after a decode stream broke off
    resume_wait_s = 15.0  # how long a broken stream waits for some decode address to answer (e.g. a restart)
    resume_poll_s = 0.2  # between those checks
    resumed = 0  # streams this client continued after a decode failure (counted per instance once one happens)

    def __init__(self, prefill: str | Sequence[str], decode: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                 *, security: Security | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        """security: TLS (tls_ca; tls_cert/tls_key for mutual TLS) and the bearer token sent on every call.
        max_message_bytes: largest message sent or received (the servers have their own limit)."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self._security = security
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._prefill = Pool(prefill if isinstance(prefill, str) else list(prefill), "prefill")
        self._decode = Pool(decode if isinstance(decode, str) else list(decode), "decode")
        self._channels: dict[str, grpc.aio.Channel] = {}

    # ---- public surface ------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                       messages: Sequence[dict[str, str]] | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: Sequence[str] | str | None = None,
                       stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                       cache_salt: str | None = None, request_id: str = "", timeout: float | None = None) -> Result:
        """Prefill then decode to the end. Give exactly one of prompt (text), token_ids, messages (chat, rendered
        by the model's template). Sampling options left None take the server's defaults (temperature 1, top_p 1,
        max_tokens the server's); temperature 0 is greedy. `timeout` bounds each of the two calls (default: the
        client's)."""
        request = build_prefill_request(prompt, token_ids, messages, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                        ignore_eos=ignore_eos, cache_salt=cache_salt, request_id=request_id)
        trace = _Trace()
        ids: list[int] = []
        logprobs: list[float] = []
        text: list[str] = []
        reason = None
        async for chunk in self._run(trace, request, timeout or self.timeout):
            ids += chunk.token_ids
            logprobs += chunk.logprobs
            text.append(chunk.text)
            reason = chunk.finish_reason or reason
        return _result(trace, ids, "".join(text), reason, logprobs)

    async def stream(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                     messages: Sequence[dict[str, str]] | None = None, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, stop: Sequence[str] | str | None = None,
                     stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                     cache_salt: str | None = None, request_id: str = "",
                     timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Prefill then yield Decode's chunks as they arrive (the first holds the first token); options as for
        `generate`. Leaving the loop early cancels the decode call, which frees its batch slot."""
        request = build_prefill_request(prompt, token_ids, messages, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                        ignore_eos=ignore_eos, cache_salt=cache_salt, request_id=request_id)
        async for chunk in self._run(_Trace(), request, timeout or self.timeout):
            yield chunk

    async def model_info(self, timeout: float | None = None) -> prefill_pb2.ModelInfo:
        backend = self._prefill.ranked()[0]
        stub = prefill_pb2_grpc.PrefillServiceStub(self._channel(backend.address))
        return await _unary(stub.GetModelInfo(prefill_pb2.GetModelInfoRequest(), timeout=timeout or self.timeout))

    async def load(self, address: str | None = None, timeout: float | None = None) -> decode_pb2.Load:
        stub = decode_pb2_grpc.DecodeServiceStub(self._channel(address or self._decode.backends[0].address))
        return await _unary(stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=timeout or self.timeout))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- the two calls -------------------------------------------------------------------------------------------
    async def _run(self, trace: _Trace, request: prefill_pb2.PrefillRequest, timeout: float) -> AsyncIterator[Chunk]:
        trace.prefill = pre = await self._call_prefill(request, timeout)
        trace.first_token_at = time.perf_counter()
        prompt_ids = list(pre.prompt_token_ids)
        received: list[int] = []
        for attempt in range(self.max_resumes + 1):
            try:
                async for chunk in self._call_decode(pre, timeout, trace):
                    received += chunk.token_ids
                    yield chunk
                return
            except Unavailable:
                if attempt == self.max_resumes or not prompt_ids or not await self._decode_back():
                    raise
            self.resumed += 1
            pre = await self._call_prefill(_resume_request(request, prompt_ids + received, len(received)), timeout)

    async def _call_prefill(self, request: prefill_pb2.PrefillRequest, timeout: float) -> prefill_pb2.PrefillResponse:
        last: QwenpdError | None = None
        for backend in self._prefill.ranked():
            stub = prefill_pb2_grpc.PrefillServiceStub(self._channel(backend.address))
            Pool.started(backend)
            ok = False
            try:
                response = await _unary(stub.Prefill(request, timeout=timeout))
                ok = True
                return response
            except Unavailable as exc:  # try the next address; anything else is the request's own failure
                last = exc
            finally:
                Pool.finished(backend, ok)
        assert last is not None
        raise last

    async def _call_decode(self, pre: prefill_pb2.PrefillResponse, timeout: float,
                           trace: _Trace) -> AsyncIterator[Chunk]:
        request = decode_pb2.DecodeRequest(request_id=pre.request_id, checkpoint_id=pre.checkpoint_id)
        last: QwenpdError | None = None
        for backend in await self._ranked_decode(timeout):
            stub = decode_pb2_grpc.DecodeServiceStub(self._channel(backend.address))
            call = stub.Decode(request, timeout=timeout)
            Pool.started(backend)
            received = ok = False
            try:
                async for pb in call:
                    received = True
                    chunk = Chunk(list(pb.token_ids), pb.text, list(pb.logprobs),
                                  _FINISH.get(pb.finish_reason) if pb.HasField("finish_reason") else None)
                    if chunk.token_ids:
                        trace.last_token_at = time.perf_counter()
                    if chunk.finish_reason is not None:
                        trace.usage = pb.usage
                    yield chunk
                ok = True
                return
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if received or not isinstance(exc, Unavailable):
                    raise exc from None
                last = exc  # nothing streamed yet: another decode service can take the checkpoint
            finally:
                call.cancel()  # no-op when finished; frees the slot when the caller stopped early
                Pool.finished(backend, ok or received)
        assert last is not None
        raise last

    async def _decode_back(self) -> bool:
        """Wait up to resume_wait_s until some decode address answers again; re-prefilling before that would
        only leave a checkpoint nobody reads."""
        deadline = time.monotonic() + self.resume_wait_s
        while True:
            for backend in self._decode.ranked():
                try:
                    await self.load(backend.address, timeout=1.0)
                    return True
                except QwenpdError:
                    pass
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.resume_poll_s)

    async def _ranked_decode(self, timeout: float) -> list[Backend]:
        if len(self._decode) > 1:
            await asyncio.gather(*(self._poll(b, min(timeout, 2.0)) for b in self._decode.backends))
        return self._decode.ranked()

    async def _poll(self, backend: Backend, timeout: float) -> None:
        try:
            load = await self.load(backend.address, timeout)
        except QwenpdError:
            backend.reported = None
        else:
            self._decode.report(backend, load.active_sequences, load.queued, load.max_batch)

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = secure_channel(address, self._security, self._options, aio=True)
        return ch


def _resume_request(request: prefill_pb2.PrefillRequest, ids: list[int], generated: int) -> prefill_pb2.PrefillRequest:
    """The request again, as token ids = prompt + the `generated` tokens already received."""
    resumed = prefill_pb2.PrefillRequest()
    resumed.CopyFrom(request)
    resumed.token_ids.ids.extend(ids)  # selects token_ids in the prompt oneof
    resumed.return_prompt_token_ids = False
    resumed.resume_generated = generated
    return resumed


async def _unary(call: Any) -> Any:
    try:
        return await call
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


def _result(trace: _Trace, ids: list[int], text: str, reason: str | None, logprobs: list[float]) -> Result:
    pre = trace.prefill
    assert pre is not None and trace.first_token_at is not None
    ttft = trace.first_token_at - trace.started
    last = trace.last_token_at or trace.first_token_at
    decode_s = max(0.0, last - trace.first_token_at)
    tpot = decode_s / (len(ids) - 1) if len(ids) > 1 else 0.0
    usage = trace.usage
    return Result(ids, text, reason, usage.prompt_tokens if usage else pre.prompt_tokens,
                  usage.cached_tokens if usage else pre.cached_tokens, ttft, tpot, logprobs, ttft, decode_s,
                  pre.request_id)


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
