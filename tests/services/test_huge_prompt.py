"""One huge prompt must not take a service down (issue 21, item 1): a 10 MB text is refused at once, over gRPC to
prefill, over the gateway's gRPC Generate and over its HTTP API (there unread: larger than any prompt that fits),
while small requests beside it are all served."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import httpx

from qwenpd.grpc_status import from_rpc_error
from qwenpd.protos.qwenpd.v1 import generate_pb2, generate_pb2_grpc, prefill_pb2, prefill_pb2_grpc

HUGE = "word " * 2_000_000  # 10 MB of text


def test_a_10mb_prompt_is_refused_at_once_while_others_are_served(services, client):
    def small(i: int) -> str | None:
        return client.generate(f"hello {i}", max_tokens=8, temperature=0).finish_reason

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        started = time.monotonic()
        others = [pool.submit(small, i) for i in range(4)]
        with grpc.insecure_channel(services.prefill, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = prefill_pb2_grpc.PrefillServiceStub(ch)
            try:
                stub.Prefill(prefill_pb2.PrefillRequest(text=HUGE), timeout=60)
                raise AssertionError("a 10 MB prompt was accepted")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                err = from_rpc_error(exc)
                assert err.field == "text" and "tokens" in err.message
        grpc_s = time.monotonic() - started
        model = httpx.get(f"http://{services.http}/v1/models", timeout=10).json()["data"][0]["id"]
        t0 = time.monotonic()
        r = httpx.post(f"http://{services.http}/v1/completions", timeout=60,
                       json={"model": model, "prompt": HUGE, "max_tokens": 4})
        http_s = time.monotonic() - t0
        # the body is larger than any prompt that fits the model's context could make: refused unread
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
        t0 = time.monotonic()
        with grpc.insecure_channel(services.gateway, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            try:
                list(generate_pb2_grpc.GenerateServiceStub(ch).Generate(generate_pb2.GenerateRequest(text=HUGE),
                                                                          timeout=60))
                raise AssertionError("a 10 MB prompt was accepted by the gateway")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        generate_s = time.monotonic() - t0
        assert all(f.result(timeout=120) in ("stop", "length") for f in others)  # nobody else was refused
    # refused from its length, not after tokenizing 10 MB (which took ~8 s holding the GIL)
    assert grpc_s < 5 and http_s < 5 and generate_s < 5, (grpc_s, http_s, generate_s)
    health = httpx.get(f"http://{services.http}/health", timeout=10)
    assert health.status_code == 200 and health.json()["prefill_up"] >= 1  # never ejected
