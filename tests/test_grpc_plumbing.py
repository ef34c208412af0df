"""The one error mapping (qwenpd.errors <-> qwenpd.grpc_status, both ways) and the server skeleton (qwenpd.grpc_server), on an in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenpd import errors, grpc_server, grpc_status
from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc

CASES = [
    errors.InvalidArgument("sampling.top_p", "must be in (0, 1]"),
    errors.NotFound("checkpoint abc not found", resource_type="checkpoint", resource_name="abc"),
    errors.FailedPrecondition("model mismatch", subject="fingerprint", reason="MODEL_MISMATCH"),
    errors.ResourceExhausted("cache full", subject="cache_store.budget_bytes", retry_after_s=0.25),
    errors.Unavailable("draining", subject="decode", retry_after_s=1.5),
    errors.DataLoss("checksum mismatch", reason="CHECKSUM_MISMATCH", metadata={"tensor": "layers.0.k"}),
    errors.DeadlineExceeded("deadline passed between chunks"),
    errors.Cancelled("client went away"),
    errors.Unauthenticated("the bearer token is not valid", reason="BAD_TOKEN"),
]


class FakeRpcError(grpc.RpcError):
    def __init__(self, status):
        self._code, self._details, self._trailers = status.code, status.details, status.trailing_metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize("exc", CASES, ids=lambda e: type(e).__name__)
def test_errors_round_trip_through_status(exc: errors.QwenpdError) -> None:
    status = grpc_status.to_status(exc)
    assert status.code == exc.code
    back = grpc_status.from_rpc_error(FakeRpcError(status))
    assert type(back) is type(exc)
    assert (back.message, back.reason, back.metadata) == (exc.message, exc.reason, exc.metadata)
    for attr in ("field", "resource_name", "resource_type", "subject", "retry_after_s"):
        if attr == "subject" and isinstance(exc, errors.Unavailable):  # sent in QuotaFailure, which is no outage's
            assert back.subject == ""
            continue
        assert getattr(back, attr, None) == getattr(exc, attr, None), attr


def test_unknown_codes_become_remote_errors() -> None:
    status = grpc_status.to_status(errors.QwenpdError("nope"))
    err = FakeRpcError(status)
    err._code = grpc.StatusCode.UNIMPLEMENTED  # a code with no domain class
    back = grpc_status.from_rpc_error(err)
    assert isinstance(back, errors.RemoteError) and back.code == grpc.StatusCode.UNIMPLEMENTED


class Decode(decode_pb2_grpc.DecodeServiceServicer):
    """Streams one chunk, then fails as the checkpoint id says."""

    async def Decode(self, request, context):
        yield decode_pb2.DecodeChunk(token_ids=[1])
        if request.checkpoint_id == "missing":
            raise errors.NotFound("checkpoint missing not found", resource_type="checkpoint", resource_name="missing")
        if request.checkpoint_id == "bug":
            raise KeyError("oops")
        yield decode_pb2.DecodeChunk(token_ids=[2])

    async def GetLoad(self, request, context):
        raise errors.Unavailable("warming up", retry_after_s=0.5)


def test_server_maps_errors_for_unary_and_streaming_calls() -> None:
    async def main() -> None:
        server = grpc_server.make_server(Decode(), host="127.0.0.1", port=0)
        assert server.port > 0 and server.service_names == ("qwenpd.v1.DecodeService",)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = decode_pb2_grpc.DecodeServiceStub(channel)
                chunks = [c.token_ids[0] async for c in stub.Decode(decode_pb2.DecodeRequest(checkpoint_id="ok"),
                                                                   timeout=5)]
                assert chunks == [1, 2]
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for c in stub.Decode(decode_pb2.DecodeRequest(checkpoint_id="missing"), timeout=5):
                        got.append(c.token_ids[0])
                assert got == [1]
                err = grpc_status.from_rpc_error(e.value)
                assert isinstance(err, errors.NotFound) and err.resource_name == "missing"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.Decode(decode_pb2.DecodeRequest(checkpoint_id="bug"), timeout=5):
                        pass
                assert e.value.code() == grpc.StatusCode.INTERNAL and "KeyError" in e.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=5)
                err = grpc_status.from_rpc_error(e.value)
                assert isinstance(err, errors.Unavailable) and err.retry_after_s == 0.5
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service="qwenpd.v1.DecodeService"), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                await server.shutdown(grace_s=0.5)
                assert (await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.shutdown(grace_s=0)

    asyncio.run(main())


def test_binding_a_taken_port_fails() -> None:
    async def main() -> None:
        first = grpc_server.make_server(Decode(), host="127.0.0.1", port=0)
        await first.start()
        try:
            with pytest.raises(OSError):
                grpc_server.make_server(Decode(), host="127.0.0.1", port=first.port)
        finally:
            await first.shutdown(grace_s=0)

    asyncio.run(main())


def test_make_server_needs_a_generated_servicer() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="generated"):
            grpc_server.make_server(object())

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _secured_decode(tmp_path, seen: list):
    """A Decode server that wants a bearer token (its on_status appends (method, code) to `seen`), with a channel
    that sends the token and one that does not."""
    from qwenpd.security import Security, channel

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    server = grpc_server.make_server(Decode(), security=Security(auth_token_file=str(token)),
                                     on_status=lambda m, c: seen.append((m.rsplit("/", 1)[-1], c)))
    await server.start()
    try:
        async with channel(server.address, Security(auth_token_file=str(token)), aio=True) as good, \
                grpc.aio.insecure_channel(server.address) as anon:
            yield good, anon
    finally:
        await server.shutdown(grace_s=0)


def test_every_call_reports_its_final_code_and_the_token_is_checked_per_call(tmp_path) -> None:
    """on_status (metrics) sees OK, mapped errors and unauthenticated calls; the bearer-token check runs on every
    call, not once per method (the error interceptor caches handlers); health checks need no token."""
    seen: list[tuple[str, grpc.StatusCode]] = []

    async def main() -> None:
        async with _secured_decode(tmp_path, seen) as (good, anon):
            ok, bad = decode_pb2_grpc.DecodeServiceStub(good), decode_pb2_grpc.DecodeServiceStub(anon)
            assert [c.token_ids[0] async for c in ok.Decode(decode_pb2.DecodeRequest(checkpoint_id="ok"))] == [1, 2]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in bad.Decode(decode_pb2.DecodeRequest(checkpoint_id="ok"), timeout=5):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert isinstance(grpc_status.from_rpc_error(e.value), errors.Unauthenticated)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ok.GetLoad(decode_pb2.GetLoadRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(anon)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())
    assert seen == [("Decode", grpc.StatusCode.OK), ("Decode", grpc.StatusCode.UNAUTHENTICATED),
                    ("GetLoad", grpc.StatusCode.UNAVAILABLE), ("Check", grpc.StatusCode.OK)]


def test_reflection_answers_as_v1_and_v1alpha() -> None:
    """buf curl and newer grpcurl ask grpc.reflection.v1; older clients v1alpha: both list the services and
    describe them (the two versions share their messages' wire format)."""
    from grpc_reflection.v1alpha import reflection_pb2

    async def ask(channel, service: str, request: reflection_pb2.ServerReflectionRequest):
        call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return [r async for r in call(iter([request]), timeout=5)][0]

    async def main() -> None:
        server = grpc_server.make_server(Decode(), host="127.0.0.1", port=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
                    listed = await ask(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
                    names = {s.name for s in listed.list_services_response.service}
                    assert {"qwenpd.v1.DecodeService", "grpc.reflection.v1.ServerReflection"} <= names, names
                    for symbol in ("qwenpd.v1.DecodeService", "grpc.reflection.v1.ServerReflection"):
                        found = await ask(channel, service, reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol=symbol))
                        assert found.file_descriptor_response.file_descriptor_proto, (service, symbol)
        finally:
            await server.shutdown(grace_s=0)

    asyncio.run(main())


def test_our_channels_reach_a_returning_server_within_a_second() -> None:
    """A backend down for a while, then back (a restarted decode service): gRPC's default reconnect backoff
    (1 s growing x1.6 to 120 s) would keep a channel that saw it down unusable for seconds; qwenpd's channels
    (qwenpd.security.channel) try again at most a second apart, so a health check readmits it within about one."""
    import socket
    import time

    from qwenpd.security import channel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def check(stub) -> bool:
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.3)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def main() -> float:
        async with channel(f"127.0.0.1:{port}", aio=True) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            down_until = time.monotonic() + 6  # by now the default backoff waits ~4 s between attempts
            while time.monotonic() < down_until:
                assert not await check(stub)
                await asyncio.sleep(0.1)
            server = grpc_server.make_server(Decode(), host="127.0.0.1", port=port)
            await server.start()
            try:
                back = time.monotonic()
                while not await check(stub):
                    assert time.monotonic() - back < 10
                    await asyncio.sleep(0.05)
                return time.monotonic() - back
            finally:
                await server.shutdown(grace_s=0)

    assert asyncio.run(main()) < 1.5


def _bad_utf8(message) -> bytes:
    """`message` serialized with its "X" replaced by bytes that are not UTF-8 (what a proto3 string must be)."""
    return message.SerializeToString().replace(b"X", b"\xff\xfe")


def test_requests_that_do_not_parse_are_invalid_argument_after_the_token_check(tmp_path, caplog) -> None:
    """Bad UTF-8 in a string field, truncated or garbage bytes: INVALID_ARGUMENT naming the message type (never
    UNKNOWN with a Python class name), on unary and streaming methods, reflection's client stream included, one
    WARNING line and no traceback; a call without the bearer token is UNAUTHENTICATED first."""
    bad_decode = _bad_utf8(decode_pb2.DecodeRequest(checkpoint_id="aXb", request_id="r"))
    seen: list[tuple[str, grpc.StatusCode]] = []

    async def main() -> None:
        async with _secured_decode(tmp_path, seen) as (good, anon):
            decode = good.unary_stream("/qwenpd.v1.DecodeService/Decode")  # raw bytes in, raw bytes out
            for raw in (bad_decode, bad_decode[:-2], b"\xff\xff\xff"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in decode(raw, timeout=5):
                        pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
                assert e.value.details().startswith("the request is not a valid qwenpd.v1.DecodeRequest message")
                assert "class" not in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await good.unary_unary("/qwenpd.v1.DecodeService/GetLoad")(b"\x0a\x80", timeout=5)
            err = grpc_status.from_rpc_error(e.value)
            assert isinstance(err, errors.InvalidArgument) and err.reason == "MALFORMED_REQUEST"
            assert err.message == "the request is not a valid qwenpd.v1.GetLoadRequest message: " \
                "Wire format was corrupt"
            reflect = good.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in reflect(iter([b"\xff\xff\xff"]), timeout=5,
                                       metadata=(("authorization", "Bearer t0ken"),)):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in anon.unary_stream("/qwenpd.v1.DecodeService/Decode")(bad_decode, timeout=5):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert [c for _, c in seen] == [grpc.StatusCode.INVALID_ARGUMENT] * 5 + [grpc.StatusCode.UNAUTHENTICATED]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["malformed request to /qwenpd.v1.DecodeService/Decode: not a valid qwenpd.v1.DecodeRequest "
                        "(String field had bad UTF-8)"], warnings  # the rest within 10 s are counted, not logged


def test_log_throttle_writes_one_line_per_interval_and_counts_the_rest(caplog) -> None:
    now = [0.0]
    throttle = grpc_status.LogThrottle(every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for t in (0.0, 1.0, 9.9, 10.0, 10.5, 25.0):
            now[0] = t
            throttle.warning(f"at {t}")
    assert [r.getMessage() for r in caplog.records] == [
        "at 0.0", "at 10.0 (2 more since the last such line)", "at 25.0 (1 more since the last such line)"]


def test_an_outage_carries_a_retry_hint_but_no_quota_failure() -> None:
    from grpc_status import rpc_status

    def details(exc: errors.QwenpdError) -> set[str]:
        status = grpc_status.to_status(exc)
        proto = rpc_status.from_call(FakeRpcError(status))
        return {d.type_url.rsplit(".", 1)[-1] for d in proto.details}

    assert details(errors.Unavailable("no decode instance is up", subject="decode", retry_after_s=1.0)) == \
        {"ErrorInfo", "RetryInfo"}
    assert details(errors.ResourceExhausted("cache full", subject="cache_store.budget_bytes", retry_after_s=0.1)) \
        == {"ErrorInfo", "QuotaFailure", "RetryInfo"}
