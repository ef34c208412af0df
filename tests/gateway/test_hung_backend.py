"""A backend that hangs (a frozen process keeps its connection open and answers nothing), in process with fake
prefill and decode servers: once the health checks eject it, our calls in flight there fail over (a prefill to
another instance, a decode stream resumed on another one) or end with Unavailable, instead of waiting for their
deadline; the gateway's grpc.health.v1 follows its pools."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qwenpd.clients.dispatch import Dispatcher, Trace, resumable
from qwenpd.clients.routing import BackendPool
from qwenpd.errors import Unavailable
from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

TOKENS = 10  # every stream: token ids 100..109, one a chunk


class Freezes:
    """Which calls hang, shared by every fake: the first `prefills` Prefill calls at once, the first decode stream
    after `decode_after` tokens. A fake that hung stays frozen (its health checks and GetLoad hang too)."""

    def __init__(self, prefills: int = 0, decode_after: int | None = None):
        self.prefills, self.decode_after = prefills, decode_after


class FakePrefill(prefill_pb2_grpc.PrefillServiceServicer, health_pb2_grpc.HealthServicer):
    def __init__(self, freezes: Freezes):
        self.freezes, self.frozen, self.calls = freezes, False, 0

    async def Prefill(self, request, context):
        self.calls += 1
        if self.freezes.prefills:
            self.freezes.prefills -= 1
            self.frozen = True
        if self.frozen:
            await asyncio.Event().wait()
        # the checkpoint says where its stream starts: after the tokens a resume has already received
        return prefill_pb2.PrefillResponse(request_id=request.request_id,
                                           checkpoint_id=f"ckpt-{request.resume_generated}",
                                           prompt_token_ids=[1, 2, 3], prompt_tokens=3)

    async def Check(self, request, context):
        if self.frozen:
            await asyncio.Event().wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class FakeDecode(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, freezes: Freezes):
        self.freezes, self.frozen, self.streams = freezes, False, 0

    async def Decode(self, request, context):
        self.streams += 1
        hang_after, self.freezes.decode_after = self.freezes.decode_after, None
        for i in range(int(request.checkpoint_id.rsplit("-", 1)[1]), TOKENS):
            if self.frozen or hang_after == 0:
                self.frozen = True
                await asyncio.Event().wait()
            if hang_after is not None:
                hang_after -= 1
            chunk = decode_pb2.DecodeChunk(token_ids=[100 + i], text=f"<{i}>")
            if i == TOKENS - 1:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
            yield chunk
            await asyncio.sleep(0.01)

    async def GetLoad(self, request, context):
        if self.frozen:
            await asyncio.Event().wait()
        return decode_pb2.Load(max_batch=8)


class Fakes:
    """Fake prefill and decode servers on 127.0.0.1 and a gateway-style Dispatcher over them (ejecting)."""

    def __init__(self, freezes: Freezes, prefills: int, decodes: int):
        self.prefills = [FakePrefill(freezes) for _ in range(prefills)]
        self.decodes = [FakeDecode(freezes) for _ in range(decodes)]
        self.servers: list[grpc.aio.Server] = []
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.addresses: dict[int, str] = {}

    async def __aenter__(self) -> "Fakes":
        for fake in (*self.prefills, *self.decodes):
            server = grpc.aio.server()
            if isinstance(fake, FakePrefill):
                prefill_pb2_grpc.add_PrefillServiceServicer_to_server(fake, server)
                health_pb2_grpc.add_HealthServicer_to_server(fake, server)
            else:
                decode_pb2_grpc.add_DecodeServiceServicer_to_server(fake, server)
            self.addresses[id(fake)] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            await server.start()
            self.servers.append(server)
        self.dispatcher = Dispatcher(BackendPool([self.addresses[id(p)] for p in self.prefills], "prefill"),
                                     BackendPool([self.addresses[id(d)] for d in self.decodes], "decode"),
                                     self._channel, poll_load=False, eject=True)
        self.dispatcher.resume_wait_s = 1.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ch in self.channels.values():
            await ch.close()
        for server in self.servers:
            await server.stop(0)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return self.channels[address]

    async def run(self, trace: Trace, timeout: float = 30.0) -> list[int]:
        request = resumable(prefill_pb2.PrefillRequest(request_id="r", text="Hang me"))
        return [t async for chunk in self.dispatcher.run(trace, request, timeout) for t in chunk.token_ids]

    async def health_rounds(self, task: asyncio.Task, seconds: float = 10.0) -> None:
        """Health check rounds (short timeouts), as the gateway's loop runs them, until `task` is done."""
        deadline = time.monotonic() + seconds
        while not task.done() and time.monotonic() < deadline:
            await self.dispatcher.check_health(timeout=0.2)
            await asyncio.sleep(0.05)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("after", [pytest.param(3, id="mid-stream"), pytest.param(0, id="before-the-first-token")])
def test_a_decode_that_hangs_resumes_on_another_once_ejected(after):
    async def main():
        async with Fakes(Freezes(decode_after=after), prefills=1, decodes=2) as f:
            trace = Trace()
            task = asyncio.create_task(f.run(trace))
            await f.health_rounds(task)
            assert task.done(), "the stream still waits on the frozen decode"
            ids = task.result()
            assert ids == [100 + i for i in range(TOKENS)]
            assert sorted(d.frozen for d in f.decodes) == [False, True]
            assert trace.resumes == (1 if after else 0)  # before the first token: the checkpoint goes elsewhere

    _run(main())


def test_a_stream_whose_only_decode_hangs_ends_unavailable():
    async def main():
        async with Fakes(Freezes(decode_after=3), prefills=1, decodes=1) as f:
            task = asyncio.create_task(f.run(Trace()))
            await f.health_rounds(task)
            assert task.done(), "the stream still waits on the frozen decode"
            with pytest.raises(Unavailable, match="stopped answering"):
                task.result()

    _run(main())


@pytest.mark.parametrize("prefills", [pytest.param(2, id="retried"), pytest.param(1, id="unavailable")])
def test_a_prefill_that_hangs_is_retried_or_unavailable(prefills):
    async def main():
        async with Fakes(Freezes(prefills=1), prefills=prefills, decodes=1) as f:
            task = asyncio.create_task(f.run(Trace()))
            await f.health_rounds(task)
            assert task.done(), "the request still waits on the frozen prefill"
            assert sum(p.frozen for p in f.prefills) == 1
            if prefills == 1:
                with pytest.raises(Unavailable, match="prefill .* stopped answering"):
                    task.result()
            else:
                assert task.result() == [100 + i for i in range(TOKENS)]

    _run(main())


def test_a_caller_that_leaves_is_not_turned_into_a_retry():
    """The cancellation of an ejected backend's calls comes out as Unavailable; the caller's own cancellation
    stays a cancellation."""
    async def main():
        async with Fakes(Freezes(decode_after=3), prefills=1, decodes=2) as f:
            task = asyncio.create_task(f.run(Trace()))
            while not any(d.frozen for d in f.decodes):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sum(d.streams for d in f.decodes) == 1  # not resumed elsewhere

    _run(main())


def test_grpc_health_follows_the_pools():
    """NOT_SERVING for "" and the gateway's service whenever HTTP /health would answer 503, SERVING when back."""
    from qwenpd.gateway.config import GatewayConfig
    from qwenpd.gateway.core import Gateway

    names = ("", "qwenpd.v1.GenerateService")

    async def statuses(servicer) -> set[int]:
        return {(await servicer.Check(health_pb2.HealthCheckRequest(service=n), None)).status for n in names}

    async def main():
        gateway = Gateway(GatewayConfig(prefill=("127.0.0.1:1",), decode=("127.0.0.1:2", "127.0.0.1:3")))
        servicer = health.aio.HealthServicer()
        await gateway.serve_health(servicer, names)
        assert await statuses(servicer) == {health_pb2.HealthCheckResponse.SERVING}
        d = gateway.dispatcher
        first, second = d.decode_pool.backends
        for backend, serving in ((first, True), (second, False), (first, True), (d.prefill_pool.backends[0], False)):
            d._set_up(backend, "decode", not backend.up)
            await asyncio.sleep(0.05)
            assert gateway.serving is serving
            want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            assert await statuses(servicer) == {want}
        await gateway.stop()

    _run(main())
