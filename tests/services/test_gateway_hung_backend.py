"""The gateway over backends that hang (SIGSTOP: the process freezes, its connections stay open), on real
processes: a decode frozen mid-stream is ejected and the stream resumes on the other decode (identical tokens, as
after kill -9) or, with no other one, ends with UNAVAILABLE soon after; a frozen prefill fails the request with
UNAVAILABLE instead of holding it to its deadline; grpc.health.v1 and HTTP /health say NOT_SERVING / 503 while
nothing can serve, and SERVING again when the backend is back."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.services.gateway_proc import start_gateway
from tests.services.test_recovery import Stack, _busy_decode

DECODES = ["decode1", "decode2"]
RESUME_WAIT_S = 2.0
# a frozen backend is ejected after three health checks in a row time out (2 s each, --health-interval 0.2);
# then a stream waits RESUME_WAIT_S for a decode instance to answer (each try at the frozen one: 1 s)
PROMPT_BOUND_S = 3 * 2.2 + RESUME_WAIT_S + 6.0


@pytest.fixture(scope="module")
def hung(tiny_model_dir, tmp_path_factory):
    """cache store, one prefill, two decodes; gateway `two` over both decodes, gateway `one` over decode1 only."""
    tmp = tmp_path_factory.mktemp("hung")
    s = Stack(tiny_model_dir, tmp)
    s.start("cache")
    try:
        s.start("prefill", *DECODES)
        flags = ("--resume-wait", str(RESUME_WAIT_S))
        two = start_gateway(tmp, [s.addr["prefill"]], [s.addr[n] for n in DECODES], *flags)
        try:
            one = start_gateway(tmp, [s.addr["prefill"]], [s.addr["decode1"]], *flags)
            try:
                yield s, two, one
            finally:
                assert one.stop() == 0
        finally:
            assert two.stop() == 0
    finally:
        s.stop()


@contextmanager
def frozen(stack: Stack, name: str):
    """SIGSTOP the service `name` for the block, SIGCONT after it whatever happens."""
    pid = stack.procs[name].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _grpc_health(g) -> set[int]:
    with grpc.insecure_channel(g.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                for name in ("", "qwenpd.v1.GenerateService")}


def _wait_serving(g, serving: bool, timeout: float = 15.0) -> None:
    """Until gRPC health and HTTP /health both say `serving` (SERVING / 200, else NOT_SERVING / 503)."""
    want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    deadline = time.monotonic() + timeout
    while True:
        grpc_status, http_status = _grpc_health(g), httpx.get(f"http://{g.http}/health", timeout=5).status_code
        if grpc_status == {want} and http_status == (200 if serving else 503):
            return
        assert time.monotonic() < deadline, f"gRPC health {grpc_status}, HTTP /health {http_status}: not {want}"
        time.sleep(0.1)


def _request(max_tokens: int = 600, text: str = "Hang me") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(text=text, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, temperature=0))


def _ids(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_a_stream_on_a_frozen_decode_resumes_on_the_other(hung):
    stack, two, _ = hung
    _wait_serving(two, True)
    with grpc.insecure_channel(two.address) as ch:
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        ref = list(stub.Generate(_request(), timeout=60))
        chunks = []
        stream = stub.Generate(_request(), timeout=60)
        chunks.append(next(stream))
        with frozen(stack, _busy_decode(stack, DECODES)):
            start = time.monotonic()
            chunks += list(stream)
            assert time.monotonic() - start < PROMPT_BOUND_S
    assert _ids(chunks) == _ids(ref)
    assert "".join(c.text for c in chunks) == "".join(c.text for c in ref)
    assert chunks[-1].timings.resumes == 1


def test_a_stream_on_the_only_decode_frozen_ends_unavailable(hung):
    stack, _, one = hung
    _wait_serving(one, True)
    with grpc.insecure_channel(one.address) as ch:
        stream = generate_pb2_grpc.GenerateServiceStub(ch).Generate(_request(3000), timeout=150)
        next(stream)
        with frozen(stack, "decode1"):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert time.monotonic() - start < PROMPT_BOUND_S
            _wait_serving(one, False)  # no decode up: not serving, on gRPC as on HTTP
    _wait_serving(one, True)  # readmitted once it answers again


def test_a_client_stream_on_a_frozen_decode_resumes_on_the_other(hung, monkeypatch):
    """`Client` has no health checks: the keepalive pings on its channels find the frozen decode (here after 1 s
    without data, instead of 20)."""
    import qwenpd.clients.client as client_mod

    monkeypatch.setattr(client_mod, "KEEPALIVE_OPTIONS", (("grpc.keepalive_time_ms", 1000),
                                                          ("grpc.keepalive_timeout_ms", 1000),
                                                          ("grpc.http2.ping_timeout_ms", 1000)))
    stack, _, _ = hung
    options = dict(max_tokens=600, ignore_eos=True, temperature=0)
    with client_mod.Client(prefill=stack.addr["prefill"], decode=[stack.addr[n] for n in DECODES], timeout=120) as c:
        ref = c.generate("Hang me", **options)
        stream = c.stream("Hang me", **options)
        ids = list(next(stream).token_ids)
        with frozen(stack, _busy_decode(stack, DECODES)):
            start = time.monotonic()
            ids += [t for chunk in stream for t in chunk.token_ids]
            assert time.monotonic() - start < 15.0
        assert c.resumed == 1
    assert ids == ref.token_ids


def test_a_request_on_a_frozen_prefill_ends_unavailable(hung):
    stack, _, one = hung
    _wait_serving(one, True)
    with grpc.insecure_channel(one.address) as ch, frozen(stack, "prefill"):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(generate_pb2_grpc.GenerateServiceStub(ch).Generate(_request(2, "Hi"), timeout=40))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - start < PROMPT_BOUND_S
        _wait_serving(one, False)
    _wait_serving(one, True)
