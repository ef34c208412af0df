"""Prefill -> decode over pools of instances, with crash resume: the one implementation behind `AsyncClient` and
the gateway (qwenpd.gateway).

`Dispatcher.run(trace, request, timeout)` prefills on the best prefill instance (another one if it is
UNAVAILABLE), streams Decode from the best decode instance and, when a decode stream breaks off (UNAVAILABLE: the
instance died or is shutting down), re-prefills prompt + the tokens already received with `resume_generated`
set (and the stream's last resume point, `resume_checkpoint_id`) and continues on the best decode instance.
Prefill restores the state the failed decode had (or recomputes the prompt), decode replays the tokens after it
and continues the same seeded random stream (the request must carry a seed: `resumable`), budget and stop-string
state, so the caller sees one uninterrupted output, identical to a run without the failure. Leaving the stream
early cancels the decode call, which frees its slot.

A backend that hangs (a frozen process: its connection stays open, it never answers) breaks no call by itself.
Two things end such calls: keepalive pings on the channels (qwenpd.security.KEEPALIVE_OPTIONS; the transport
closes and its calls fail with UNAVAILABLE) and, in the gateway, the health checks: when they eject a backend
because it stopped answering, every call of ours in flight there is cancelled as UNAVAILABLE (`_abandon`), so
a prefill is retried on another instance and a decode stream resumes on another one, as after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from qwenpd.clients.routing import Backend, BackendPool
from qwenpd.errors import DeadlineExceeded, InvalidArgument, QwenpdError, Unavailable
from qwenpd.grpc_status import from_rpc_error
from qwenpd.protos.qwenpd.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, encoder_pb2, encoder_pb2_grpc,
                                     prefill_pb2, prefill_pb2_grpc)

FINISH_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error",
                common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}


@dataclass(slots=True)
class Chunk:
    """A piece of streamed output. `finish_reason` ("stop", "length", ...) only on the last chunk."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None = None
    # with top_logprobs: each token's candidates, most likely first: (id, log-probability, the token's own text,
    # its own bytes)
    top_logprobs: list[list[tuple[int, float, str, bytes]]] = field(default_factory=list)
    token_bytes: list[bytes] = field(default_factory=list)  # with SamplingParams.token_bytes: each token's own


@dataclass(slots=True)
class Trace:
    """Filled in while a request runs (perf_counter seconds).

    Time per output token is defined over tokens, not chunks: tpot_s = (time the last token arrived - time the
    first token was known) / (tokens - 1). The first token is known when the prefill response arrives (a fixed
    point, never delayed by how decode's chunks are coalesced), so several tokens sharing a chunk cannot shrink it.
    """

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    resumes: int = 0
    prefill: prefill_pb2.PrefillResponse | None = None
    usage: common_pb2.Usage | None = None
    resume_point: str = ""  # the checkpoint id of the decode stream's last ResumePoint

    def received(self, n: int, at: float | None = None) -> None:
        if n:
            self.tokens += n
            self.last_token_at = time.perf_counter() if at is None else at

    @property
    def reasoning_open(self) -> bool:
        """Whether the prompt's chat template opened the model's reasoning (the first prefill says)."""
        return bool(self.prefill is not None and self.prefill.reasoning_open)

    @property
    def ttft_s(self) -> float:
        return 0.0 if self.first_token_at is None else self.first_token_at - self.started

    @property
    def decode_s(self) -> float:
        if self.first_token_at is None or self.last_token_at is None:
            return 0.0
        return max(0.0, self.last_token_at - self.first_token_at)

    @property
    def tpot_s(self) -> float:
        return self.decode_s / (self.tokens - 1) if self.tokens > 1 else 0.0


def resumable(request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillRequest:
    """Make `request` one that can be resumed: draw the seed here when the caller gave none, so that a resumed
    request continues the same random stream, and ask for the prompt's token ids, which a resume sends back.
    Modifies and returns `request`."""
    if not request.sampling.HasField("seed"):
        request.sampling.seed = secrets.randbits(63)
    request.return_prompt_token_ids = True
    return request


class Dispatcher:
    """Calls prefill then decode on the best instances of two pools and resumes broken decode streams.

    channel(address) gives the (cached) aio channel of an address. poll_load: ask every decode instance for its
    GetLoad just before each choice (a client without a background poller); the gateway instead keeps loads and
    health current with `check_health()` and sets eject: a call failing with UNAVAILABLE ejects its backend
    until a health check readmits it.
    """

    max_resumes = 3  # re-prefill and continue at most this often per request after a decode stream broke off
    resume_wait_s = 15.0  # how long a broken stream waits for some decode address to answer (e.g. a restart)
    resume_poll_s = 0.2  # between those checks

    def __init__(self, prefill: BackendPool, decode: BackendPool, channel: Callable[[str], grpc.aio.Channel], *,
                 poll_load: bool = True, eject: bool = False, encoders: BackendPool | None = None):
        self.prefill_pool = prefill
        self.decode_pool = decode
        self.encoder_pool = encoders  # image prompts are encoded there first (EncoderService); None: by prefill
        self._channel = channel
        self.poll_load = poll_load
        self.eject = eject
        self.resumed = 0  # streams continued after a decode failure
        self._calls: dict[str, set[Any]] = {}  # address -> our prefill / decode / encode calls in flight there
        self._abandoned: set[Any] = set()  # of those, the ones `_abandon` cancelled
        # on_health(backend, kind, why): called when a backend is ejected (why = the failure) or readmitted
        self.on_health: Callable[[Backend, str, str], None] = lambda backend, kind, why: None

    # ---- the request ---------------------------------------------------------------------------------------------
    async def run(self, trace: Trace, request: prefill_pb2.PrefillRequest, timeout: float) -> AsyncIterator[Chunk]:
        """Prefill then decode's chunks, resumed on another decode instance if the stream breaks off. `request`
        must carry a seed and ask for the prompt's token ids (`resumable`)."""
        if not self.poll_load:
            self.decode_pool.ranked()  # no decode instance can take it: refuse before prefill does the work
        request = await self.encode(request, timeout)
        trace.prefill = pre = await self.prefill(request, timeout)
        trace.first_token_at = time.perf_counter()
        prompt_ids = list(pre.prompt_token_ids)
        received: list[int] = []
        finished = False
        for attempt in range(self.max_resumes + 1):
            try:
                async for chunk in self.decode(pre, timeout, trace):
                    received += chunk.token_ids
                    finished = chunk.finish_reason is not None
                    yield chunk
                return
            except Unavailable:
                if finished:  # the call broke after its last chunk (before its status): the stream is whole
                    return
                if attempt == self.max_resumes or not prompt_ids or not await self._decode_back():
                    raise
            self.resumed += 1
            trace.resumes += 1
            pre = await self.prefill(resume_request(request, prompt_ids + received, len(received),
                                                    trace.resume_point), timeout)

    async def encode(self, request: prefill_pb2.PrefillRequest, timeout: float) -> prefill_pb2.PrefillRequest:
        """With an encoder pool and a prompt with images: the request with each item's `encoded` set by the best
        encoder instance (another one on UNAVAILABLE). When no instance can take it, the request as it was:
        prefill then runs the tower itself. An error of the request's own (INVALID_ARGUMENT) is raised."""
        if self.encoder_pool is None or not media_of(request):
            return request
        out = prefill_pb2.PrefillRequest()
        out.CopyFrom(request)
        media = media_of(out)
        call = encoder_pb2.EncodeRequest(request_id=request.request_id, media=media)
        if request.HasField("cache_salt"):
            call.cache_salt = request.cache_salt
        try:
            backends = self.encoder_pool.ranked()
        except QwenpdError:
            return request
        for backend in backends:
            stub = encoder_pb2_grpc.EncoderServiceStub(self._channel(backend.address))
            BackendPool.started(backend)
            ok = False
            try:
                response = await self._unary(backend, "encoder", stub.Encode(call, timeout=timeout))
                ok = True
            except InvalidArgument as exc:  # named as the request names the item (media[k] is the k-th of all)
                raise InvalidArgument(_own_field(request, exc.field), exc.description, reason=exc.reason) from None
            except QwenpdError as exc:  # down, full or failing: the next one, and in the end prefill's own tower
                if isinstance(exc, (Unavailable, DeadlineExceeded)):
                    self._failed(backend, "encoder", exc)
                continue
            finally:
                BackendPool.finished(backend, ok)
            for m, encoded in zip(media, response.items):
                m.encoded.CopyFrom(encoded)
            return out
        return request

    async def prefill(self, request: prefill_pb2.PrefillRequest, timeout: float) -> prefill_pb2.PrefillResponse:
        """Prefill on the best instance; on UNAVAILABLE the next one (anything else is the request's own fault)."""
        last: QwenpdError | None = None
        for backend in self.prefill_pool.ranked():
            stub = prefill_pb2_grpc.PrefillServiceStub(self._channel(backend.address))
            BackendPool.started(backend)
            ok = False
            try:
                response = await self._unary(backend, "prefill", stub.Prefill(request, timeout=timeout))
                ok = True
                return response
            except Unavailable as exc:
                last = exc
                self._failed(backend, "prefill", exc)
            finally:
                BackendPool.finished(backend, ok)
        assert last is not None
        raise last

    async def decode(self, pre: prefill_pb2.PrefillResponse, timeout: float, trace: Trace) -> AsyncIterator[Chunk]:
        """Decode's chunks of one checkpoint; UNAVAILABLE before the first chunk tries the next instance."""
        request = decode_pb2.DecodeRequest(request_id=pre.request_id, checkpoint_id=pre.checkpoint_id)
        last: QwenpdError | None = None
        for backend in await self._ranked_decode(timeout):
            stub = decode_pb2_grpc.DecodeServiceStub(self._channel(backend.address))
            call = stub.Decode(request, timeout=timeout)
            BackendPool.started(backend)
            received = ok = False
            try:
                with self._tracking(backend, "decode", call):
                    async for pb in call:
                        received = True
                        if pb.HasField("resume_point"):
                            trace.resume_point = pb.resume_point.checkpoint_id
                            if not pb.token_ids and not pb.text and not pb.HasField("finish_reason"):
                                continue  # only where to resume from: nothing for the caller
                        finish = FINISH_NAMES.get(pb.finish_reason) if pb.HasField("finish_reason") else None
                        chunk = Chunk(list(pb.token_ids), pb.text, list(pb.logprobs), finish,
                                      [[(c.id, c.logprob, c.text, c.bytes) for c in t.candidates]
                                       for t in pb.top_logprobs], list(pb.token_bytes))
                        trace.received(len(chunk.token_ids))
                        if chunk.finish_reason is not None:
                            trace.usage = pb.usage
                        yield chunk
                ok = True
                return
            except (grpc.RpcError, Unavailable) as err:
                exc = from_rpc_error(err) if isinstance(err, grpc.RpcError) else err
                if isinstance(exc, Unavailable):
                    self._failed(backend, "decode", exc)
                if received or not isinstance(exc, Unavailable):
                    raise exc from None
                last = exc  # nothing streamed yet: another decode instance can take the checkpoint
            finally:
                call.cancel()  # no-op when finished; frees the slot when the caller stopped early
                BackendPool.finished(backend, ok or received)
        assert last is not None
        raise last

    # ---- loads and health ----------------------------------------------------------------------------------------
    async def load(self, address: str, timeout: float) -> decode_pb2.Load:
        stub = decode_pb2_grpc.DecodeServiceStub(self._channel(address))
        return await unary(stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=timeout))

    async def check_health(self, timeout: float = 2.0) -> None:
        """One round: every decode instance's GetLoad (its load, and whether it answers) and every prefill
        instance's grpc.health.v1 status. A backend that refuses connections or says NOT_SERVING is ejected at
        once; one that is only slow to answer (a busy host) after `slow_checks` rounds in a row. A backend that
        passes is readmitted."""
        await asyncio.gather(*(self._poll(b, timeout) for b in self.decode_pool.backends),
                             *(self._check_prefill(b, timeout) for b in self.prefill_pool.backends),
                             *(self._check_prefill(b, timeout, "encoder")
                               for b in (self.encoder_pool.backends if self.encoder_pool else ())))

    slow_checks = 3

    async def _check_prefill(self, backend: Backend, timeout: float, kind: str = "prefill") -> None:
        """grpc.health.v1 of a prefill (or encoder) instance."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel(backend.address))
        try:
            status = (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)).status
        except grpc.RpcError as err:
            self._checked(backend, kind, from_rpc_error(err))
        else:
            self._checked(backend, kind, None if status == health_pb2.HealthCheckResponse.SERVING else
                          Unavailable("not serving"))

    async def _poll(self, backend: Backend, timeout: float) -> None:
        try:
            load = await self.load(backend.address, timeout)
        except QwenpdError as exc:
            backend.reported = None
            self._checked(backend, "decode", exc)
        else:
            self.decode_pool.report(backend, load.active_sequences, load.queued, load.max_batch)
            self._checked(backend, "decode", None)

    def _checked(self, backend: Backend, kind: str, error: QwenpdError | None) -> None:
        if error is None:
            backend.slow_checks = 0
            self._set_up(backend, kind, True)
            return
        if isinstance(error, DeadlineExceeded):
            backend.slow_checks += 1
            if backend.slow_checks < self.slow_checks:
                return
        self._set_up(backend, kind, False, error.message)
        if isinstance(error, DeadlineExceeded) and self.eject:
            self._abandon(backend)  # it stopped answering: what runs there may never end

    def _set_up(self, backend: Backend, kind: str, up: bool, why: str = "") -> None:
        if not self.eject:
            return
        if BackendPool.set_up(backend, up):
            self.on_health(backend, kind, why)

    def _failed(self, backend: Backend, kind: str, error: QwenpdError) -> None:
        self._set_up(backend, kind, False, error.message)

    # ---- calls in flight -----------------------------------------------------------------------------------------
    async def _unary(self, backend: Backend, kind: str, call: Any) -> Any:
        with self._tracking(backend, kind, call):
            return await unary(call)

    @contextlib.contextmanager
    def _tracking(self, backend: Backend, kind: str, call: Any) -> Iterator[None]:
        """`call` is in flight on `backend` inside this block. When `_abandon` cancels it, it fails with
        Unavailable (not CancelledError: the caller did not leave), which retries or resumes the request."""
        calls = self._calls.setdefault(backend.address, set())
        calls.add(call)
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call not in self._abandoned or (task is not None and task.cancelling()):
                raise
            raise Unavailable(f"{kind} {backend.address} stopped answering", subject=kind) from None
        finally:
            calls.discard(call)
            self._abandoned.discard(call)

    def _abandon(self, backend: Backend) -> None:
        """Cancel our calls in flight on a backend that stopped answering (a frozen process keeps its connection
        open, so they would wait for their deadline): each fails with Unavailable (`_tracking`)."""
        for call in list(self._calls.get(backend.address, ())):
            self._abandoned.add(call)
            call.cancel()

    async def _decode_back(self) -> bool:
        """Wait up to resume_wait_s until some decode address answers again; re-prefilling before that would
        only leave a checkpoint nobody reads."""
        deadline = time.monotonic() + self.resume_wait_s
        while True:
            for backend in self.decode_pool.backends:
                try:
                    load = await self.load(backend.address, timeout=1.0)
                except QwenpdError:
                    continue
                self.decode_pool.report(backend, load.active_sequences, load.queued, load.max_batch)
                self._set_up(backend, "decode", True)
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.resume_poll_s)

    async def _ranked_decode(self, timeout: float) -> list[Backend]:
        if self.poll_load and len(self.decode_pool) > 1:
            await asyncio.gather(*(self._poll(b, min(timeout, 2.0)) for b in self.decode_pool.backends))
        return self.decode_pool.ranked()


def media_of(request: prefill_pb2.PrefillRequest) -> list[common_pb2.Media]:
    """The request's images and videos in prompt order (its own `media`, or its chat messages' parts): the
    messages themselves, so setting a field sets it in the request."""
    if request.WhichOneof("prompt") == "chat":
        return [part.media for m in request.chat.messages for part in m.parts if part.WhichOneof("part") == "media"]
    return list(request.media)


def _own_field(request: prefill_pb2.PrefillRequest, field: str) -> str:
    """An EncodeRequest's `media[k]...` as the field of the prefill request it came from (a chat's k-th media part:
    chat.messages[i].parts[j].media...)."""
    if request.WhichOneof("prompt") != "chat" or not field.startswith("media["):
        return field
    k, _, rest = field[len("media["):].partition("]")
    names = [f"chat.messages[{i}].parts[{j}].media" for i, m in enumerate(request.chat.messages)
             for j, part in enumerate(m.parts) if part.WhichOneof("part") == "media"]
    return names[int(k)] + rest if k.isdigit() and int(k) < len(names) else field


def resume_request(request: prefill_pb2.PrefillRequest, ids: list[int], generated: int, resume_point: str = ""
                   ) -> prefill_pb2.PrefillRequest:
    """The request again, as token ids = prompt + the `generated` tokens already received, resumed from the
    broken stream's last resume point (a checkpoint id; "" = none)."""
    resumed = prefill_pb2.PrefillRequest()
    resumed.CopyFrom(request)
    if request.WhichOneof("prompt") == "chat":  # its images and videos, in prompt order, as the request's media
        resumed.media.extend(media_of(request))
    del resumed.token_ids.ids[:]  # a token-id prompt's own ids are among `ids` already
    resumed.token_ids.ids.extend(ids)  # selects token_ids in the prompt oneof
    resumed.return_prompt_token_ids = False
    resumed.ClearField("prompt_logprobs")  # the prompt was scored by the first prefill
    resumed.resume_generated = generated
    resumed.resume_checkpoint_id = resume_point
    return resumed


async def unary(call: Any) -> Any:
    try:
        return await call
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
