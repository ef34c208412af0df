"""The gateway's engine room, shared by its gRPC and HTTP front ends: backend channels, the Dispatcher (routing,
retries, crash resume), the health loop, and `n` completions of one prompt.

n > 1: a hand-off checkpoint is single-use (decode deletes it once loaded) and already holds the first token,
sampled with one seed, so n streams from one checkpoint would be n copies of one sample. Instead choice 0 is
prefilled first and choices 1..n-1 follow once it has answered, each with its own seed (seed + i): they restore
the prompt from the prefix cache choice 0 has just filled and compute only the tail after the last cached block
(the whole prompt when it is shorter than one block).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from qwenpd.clients.dispatch import Chunk, Dispatcher, Trace, resumable, unary
from qwenpd.clients.routing import Backend, BackendPool
from qwenpd.gateway.config import GatewayConfig
from qwenpd.gateway.metrics import GatewayMetrics
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from qwenpd.security import KEEPALIVE_OPTIONS
from qwenpd.security import channel as secure_channel

log = logging.getLogger(__name__)

SEED_MASK = (1 << 63) - 1


@dataclass(slots=True)
class Choice:
    """One completion of a request, filled in as it streams."""

    index: int
    trace: Trace = field(default_factory=Trace)
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # one string per token (token_texts())
    top_logprobs: list[list[tuple[int, float, str, bytes]]] = field(default_factory=list)  # per token, when asked
    token_bytes: list[bytes] = field(default_factory=list)  # per token, with SamplingParams.token_bytes
    finish_reason: str | None = None


class Gateway:
    """Create inside the running event loop; `await start()` before serving, `await stop()` after."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics | None = None):
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self._options = [("grpc.max_receive_message_length", config.max_message_bytes),
                         ("grpc.max_send_message_length", config.max_message_bytes), *KEEPALIVE_OPTIONS]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.dispatcher = Dispatcher(BackendPool(list(config.prefill), "prefill", config.max_in_flight_prefill),
                                     BackendPool(list(config.decode), "decode", config.max_in_flight_decode),
                                     self._channel, poll_load=False, eject=True,
                                     encoders=BackendPool(list(config.encoders), "encoder",
                                                          config.max_in_flight_prefill) if config.encoders else None)
        self.dispatcher.resume_wait_s = config.resume_wait_s
        self.dispatcher.on_health = self._on_health
        self._health_task: asyncio.Task | None = None
        self.model_info: prefill_pb2.ModelInfo | None = None
        self._grpc_health: Any = None  # the gRPC server's grpc.health.v1 servicer, once `serve_health` is called
        self._grpc_health_names: tuple[str, ...] = ()
        self._grpc_health_lock = asyncio.Lock()
        self._grpc_health_tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.dispatcher.check_health()
        for kind, pool in (("prefill", self.dispatcher.prefill_pool), ("decode", self.dispatcher.decode_pool)):
            for b in pool.backends:
                self.metrics.backend_up.labels(kind, b.address).set(int(b.up))
        self._health_task = asyncio.create_task(self._health_loop())
        try:
            await self.get_model_info(5.0)
        except Exception as exc:  # noqa: BLE001 - no prefill up yet: asked again on first use
            log.warning("model info not available yet: %s", exc)

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await asyncio.gather(*self._grpc_health_tasks, return_exceptions=True)
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    @property
    def serving(self) -> bool:
        """Whether requests can be served: some prefill and some decode instance is up. False: HTTP /health
        answers 503 and grpc.health.v1 NOT_SERVING."""
        d = self.dispatcher
        return d.prefill_pool.up_count() > 0 and d.decode_pool.up_count() > 0

    async def serve_health(self, health: Any, services: Iterable[str]) -> None:
        """From now on report `serving` through `health` (a grpc.health.v1 aio servicer) for `services` ("" and
        the gateway's own), as load balancers and Kubernetes probes ask: NOT_SERVING while no prefill or no
        decode instance is up, SERVING again when one is back."""
        self._grpc_health, self._grpc_health_names = health, tuple(services)
        await self._publish_health()

    async def _publish_health(self) -> None:
        from grpc_health.v1 import health_pb2

        async with self._grpc_health_lock:  # the state as it is when the lock is ours: the last call sets the last
            answer = health_pb2.HealthCheckResponse
            status = answer.SERVING if self.serving else answer.NOT_SERVING
            for name in self._grpc_health_names:
                await self._grpc_health.set(name, status)  # ignored once the server shuts down (stays NOT_SERVING)

    def _on_health(self, backend: Backend, kind: str, why: str) -> None:
        self.metrics.backend_up.labels(kind, backend.address).set(int(backend.up))
        if self._grpc_health is not None:
            task = asyncio.get_running_loop().create_task(self._publish_health())
            self._grpc_health_tasks.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self._grpc_health_tasks.discard)
        if backend.up:
            log.warning("%s %s readmitted", kind, backend.address)
        else:
            log.warning("%s %s ejected: %s", kind, backend.address, why)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.dispatcher.check_health()
            except Exception:  # noqa: BLE001 - the loop must outlive any one round
                log.exception("health check round failed")

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = secure_channel(address, self.config.security, self._options, aio=True)
        return ch

    # ---- requests ------------------------------------------------------------------------------------------------
    async def get_model_info(self, timeout: float) -> prefill_pb2.ModelInfo:
        if self.model_info is None:
            backend = self.dispatcher.prefill_pool.ranked()[0]
            stub = prefill_pb2_grpc.PrefillServiceStub(self._channel(backend.address))
            self.model_info = await unary(stub.GetModelInfo(prefill_pb2.GetModelInfoRequest(), timeout=timeout))
        return self.model_info

    @property
    def model_name(self) -> str:
        """The name the model is reported under: the first served name, else the prefill's."""
        return self.model_names[0] if self.model_names else ""

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name requests may give (served_model_names, else the prefill's model name)."""
        if self.config.served_model_names:
            return self.config.served_model_names
        return (self.model_info.model_name,) if self.model_info else ()

    def timeout(self, caller_remaining: float | None) -> float:
        return self.config.timeout_s if caller_remaining is None else min(self.config.timeout_s, caller_remaining)

    async def stream(self, request: prefill_pb2.PrefillRequest, timeout: float,
                     trace: Trace) -> AsyncIterator[Chunk]:
        """One completion: the chunks of prefill -> decode, resumed across decode failures. Observes TTFT/TPOT."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        resumable(request)
        async for chunk in self.dispatcher.run(trace, request, timeout):
            yield chunk
            if chunk.finish_reason is not None:
                self._observe(trace)

    def _observe(self, trace: Trace) -> None:
        self.metrics.ttft.observe(trace.ttft_s)
        if trace.tokens > 1:
            self.metrics.tpot.observe(trace.tpot_s)
        self.metrics.output_tokens.inc(trace.tokens)
        if trace.resumes:
            self.metrics.resumes.inc(trace.resumes)

    async def choices(self, request: prefill_pb2.PrefillRequest, n: int,
                      timeout: float) -> AsyncIterator[tuple[Choice, Chunk]]:
        """n completions of one prompt, their chunks interleaved as they arrive (choice 0 prefills first; see the
        module docstring). Leaving early cancels every stream, which frees their decode slots."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        resumable(request)
        if n == 1:  # no tasks, no queue: one stream as it comes
            choice = Choice(0)
            async for chunk in self.stream(request, timeout, choice.trace):
                yield choice, chunk
            return
        queue: asyncio.Queue = asyncio.Queue()
        first_answered = asyncio.Event()
        choices = [Choice(i) for i in range(n)]

        async def pump(choice: Choice) -> None:
            req = prefill_pb2.PrefillRequest()
            req.CopyFrom(request)
            if choice.index:
                await first_answered.wait()
                req.request_id = f"{request.request_id}-{choice.index}"
                req.sampling.seed = (request.sampling.seed + choice.index) & SEED_MASK
            try:
                async for chunk in self.stream(req, timeout, choice.trace):
                    first_answered.set()
                    await queue.put((choice, chunk))
            except Exception as exc:  # noqa: BLE001 - handed to the reader, who raises it
                await queue.put((choice, exc))
                return
            finally:
                first_answered.set()
            await queue.put((choice, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            running = n
            while running:
                choice, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield choice, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def usage(trace: Trace) -> common_pb2.Usage:
    """Token counts of one completion: the prompt as first prefilled (a resume re-prefills prompt + generated
    tokens, which are not prompt tokens) and every token streamed, across resumes."""
    pre = trace.prefill
    return common_pb2.Usage(prompt_tokens=pre.prompt_tokens if pre else 0,
                            cached_tokens=pre.cached_tokens if pre else 0, completion_tokens=trace.tokens,
                            image_tokens=pre.image_tokens if pre else 0)


def token_texts(token_ids: list[int], text: str) -> list[str]:
    """One string per token of a chunk. Decode sends text per chunk, not per token: the chunk's text goes to its
    last token and the others get "" (so the strings still concatenate to the output text)."""
    return [""] * (len(token_ids) - 1) + [text] if token_ids else []


def collect(choice: Choice, chunk: Chunk) -> None:
    choice.token_ids += chunk.token_ids
    choice.text.append(chunk.text)
    if chunk.token_ids:
        choice.token_texts += token_texts(chunk.token_ids, chunk.text)
    elif chunk.text and choice.token_texts:
        choice.token_texts[-1] += chunk.text
    choice.logprobs += chunk.logprobs
    choice.top_logprobs += chunk.top_logprobs
    choice.token_bytes += chunk.token_bytes
    choice.finish_reason = chunk.finish_reason or choice.finish_reason

