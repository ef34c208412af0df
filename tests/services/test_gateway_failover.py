"""The gateway over two prefill and two decode instances (real processes): a decode instance killed mid-stream is
invisible to gRPC and HTTP callers (identical output, resumed server-side), a stopped prefill instance is
ejected and its requests go to the other one, and it is readmitted when back."""

from __future__ import annotations

import signal
import time

import grpc
import httpx
import openai
import pytest

from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.services.gateway_proc import start_gateway
from tests.services.test_recovery import Stack, _busy_decode

PROMPT = "The failover prompt"
DECODES = ["decode1", "decode2"]


@pytest.fixture(scope="module")
def pools(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    s = Stack(tiny_model_dir, tmp)
    s.extra = {}
    s.start("cache")
    try:
        s.start("prefill1", "prefill3", *DECODES)
        g = start_gateway(tmp, [s.addr["prefill1"], s.addr["prefill3"]], [s.addr[n] for n in DECODES],
                          "--resume-wait", "30")
        try:
            yield s, g
        finally:
            assert g.stop() == 0
    finally:
        s.stop()


def _ensure(stack: Stack, *names: str) -> None:
    missing = [n for n in names if n not in stack.procs]
    for n in missing:  # back at the address the gateway knows
        stack.extra[n] = ("--listen", stack.addr[n])
    if missing:
        stack.start(*missing)


def _health(g) -> dict:
    return httpx.get(f"http://{g.http}/health", timeout=10).json()


def _wait_health(g, key: str, value: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(g)[key] != value:
        assert time.monotonic() < deadline, f"{key} never became {value}: {_health(g)}"
        time.sleep(0.05)


@pytest.mark.parametrize("sampling", [
    pytest.param(dict(temperature=0), id="greedy"),
    pytest.param(dict(temperature=1.0, seed=77, stop=["ab", "e t"]), id="seeded-stop"),
])
def test_grpc_stream_survives_a_killed_decode(pools, sampling):
    stack, g = pools
    _ensure(stack, *DECODES)
    _wait_health(g, "decode_up", 2)
    params = common_pb2.SamplingParams(max_tokens=400, ignore_eos=True, **sampling)
    request = generate_pb2.GenerateRequest(text=PROMPT, sampling=params)
    with grpc.insecure_channel(g.address) as ch:
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        ref = list(stub.Generate(request, timeout=60))
        chunks = []
        for i, chunk in enumerate(stub.Generate(request, timeout=60)):
            chunks.append(chunk)
            if i == 3:
                stack.kill(_busy_decode(stack, DECODES))
    ids = lambda cs: [t for c in cs for t in c.token_ids]  # noqa: E731
    text = lambda cs: "".join(c.text for c in cs)  # noqa: E731
    assert ids(chunks) == ids(ref) and text(chunks) == text(ref)
    assert chunks[-1].timings.resumes == 1 and chunks[-1].usage.completion_tokens == len(ids(ref))
    assert chunks[-1].finish_reason == ref[-1].finish_reason


def test_http_stream_survives_a_killed_decode(pools):
    stack, g = pools
    _ensure(stack, *DECODES)
    _wait_health(g, "decode_up", 2)
    with openai.OpenAI(base_url=f"http://{g.http}/v1", api_key="x", max_retries=0, timeout=60) as c:
        model = c.models.list().data[0].id
        kw = dict(model=model, prompt=PROMPT, max_tokens=400, temperature=0.8, seed=5,
                  extra_body={"ignore_eos": True})
        ref = c.completions.create(**kw).choices[0].text
        got = []
        for i, event in enumerate(c.completions.create(stream=True, **kw)):
            got.append(event.choices[0].text)
            if i == 3:
                stack.kill(_busy_decode(stack, DECODES))
    assert "".join(got) == ref


def test_stopped_prefill_is_ejected_then_readmitted(pools):
    stack, g = pools
    _ensure(stack, *DECODES)
    _wait_health(g, "prefill_up", 2)
    proc = stack.procs.pop("prefill1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    with grpc.insecure_channel(g.address) as ch:  # at once, before any health check noticed: retried elsewhere
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        request = generate_pb2.GenerateRequest(text=PROMPT, sampling=common_pb2.SamplingParams(
            temperature=0, max_tokens=4, ignore_eos=True))
        for _ in range(4):
            assert sum(len(c.token_ids) for c in stub.Generate(request, timeout=60)) == 4
    _wait_health(g, "prefill_up", 1)
    _ensure(stack, "prefill1")
    _wait_health(g, "prefill_up", 2)


def test_32_concurrent_streams_survive_a_killed_decode(pools):
    """Every one of 32 concurrent streams (seeded sampling, different prompts) completes with the output of an
    undisturbed run when one of the two decode instances is killed under them."""
    import asyncio

    stack, g = pools
    _ensure(stack, *DECODES)
    _wait_health(g, "decode_up", 2)
    requests = [generate_pb2.GenerateRequest(text=f"Stream number {i} says", sampling=common_pb2.SamplingParams(
        temperature=0.8, seed=1000 + i, max_tokens=300, ignore_eos=True)) for i in range(32)]

    async def run_all(kill: bool) -> list[tuple[list[int], str, int]]:
        async with grpc.aio.insecure_channel(g.address) as ch:
            stub = generate_pb2_grpc.GenerateServiceStub(ch)
            started = asyncio.Event()

            async def one(request) -> tuple[list[int], str, int]:
                ids, text, resumes = [], [], 0
                async for chunk in stub.Generate(request, timeout=120):
                    ids += chunk.token_ids
                    text.append(chunk.text)
                    resumes = chunk.timings.resumes or resumes
                    if len(ids) > 20:
                        started.set()
                return ids, "".join(text), resumes

            async def killer() -> None:
                await started.wait()
                await asyncio.to_thread(lambda: stack.kill(_busy_decode(stack, DECODES)))

            tasks = [one(r) for r in requests] + ([killer()] if kill else [])
            return (await asyncio.gather(*tasks))[:len(requests)]

    ref = asyncio.run(run_all(kill=False))
    got = asyncio.run(run_all(kill=True))
    assert [(ids, text) for ids, text, _ in got] == [(ids, text) for ids, text, _ in ref]
    assert sum(r for _, _, r in got) >= 1  # some streams were on the killed instance and were resumed
