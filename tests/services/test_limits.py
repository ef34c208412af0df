"""Per-request limits through `serve all` (each one at the limit: accepted; one past it: refused with the right
code and field; the services keep serving), and the Prometheus /metrics endpoint of each service.

Queue depth and batch size are covered by tests/decode_service/test_scheduler.py and
tests/prefill_service/test_queue.py (Scheduler and WorkQueue at and past their bounds) and test_lifecycle.py (a full
prefill queue through real processes)."""

from __future__ import annotations

import os
import time
import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwenpd.clients import Client, InvalidArgument, ResourceExhausted
from qwenpd.grpc_status import from_rpc_error
from qwenpd.protos.qwenpd.v1 import prefill_pb2, prefill_pb2_grpc
from tests.services.conftest import start_serve_all, stop_serve_all

BLOCK = 16
MAX_PROMPT, MAX_NEW, MAX_STOPS, MAX_STOP_LEN, MAX_MESSAGE = 64, 16, 2, 8, 8192


def _free_port_run(n: int = 3) -> int:
    """A port p with p, p+1, ..., p+n-1 all free on 127.0.0.1 (the metrics ports of serve all)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for i in range(n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def _cache_bytes_of_one_block(engine) -> int:
    """Tensor bytes a 20-token prompt adds to the prefix cache at block size 16: KV block 0 + a snapshot at 16."""
    _, state = engine.prefill(list(range(1, BLOCK + 1)))
    tensors = [*state.kv_tensors(0, BLOCK).values(), *state.deltanet_tensors().values()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory, engine):
    metrics_port = _free_port_run()
    s = start_serve_all(tiny_model_dir, tmp_path_factory.mktemp("limits"), f"lim{os.getpid()}",
                        "--block-size", str(BLOCK), "--snapshot-interval", "0",
                        "--max-prompt-tokens", str(MAX_PROMPT), "--max-new-tokens", str(MAX_NEW),
                        "--max-stop-strings", str(MAX_STOPS), "--max-stop-length", str(MAX_STOP_LEN),
                        "--max-message-bytes", str(MAX_MESSAGE),
                        "--max-cache-bytes-per-request", str(_cache_bytes_of_one_block(engine)),
                        "--metrics-port", str(metrics_port))
    s.metrics_port = metrics_port
    yield s
    assert stop_serve_all(s) == 0


@pytest.fixture(scope="module")
def lclient(limited):
    with Client(prefill=limited.prefill, decode=limited.decode, timeout=60) as c:
        yield c


LIMITS = {  # name: (accepted kwargs, refused kwargs, field)
    "prompt-tokens": (dict(token_ids=[7] * MAX_PROMPT), dict(token_ids=[7] * (MAX_PROMPT + 1)), "token_ids.ids"),
    "new-tokens": (dict(prompt="hi", max_tokens=MAX_NEW), dict(prompt="hi", max_tokens=MAX_NEW + 1),
                   "sampling.max_tokens"),
    "stop-strings": (dict(prompt="hi", stop=["zq"] * MAX_STOPS), dict(prompt="hi", stop=["zq"] * (MAX_STOPS + 1)),
                     "sampling.stop"),
    "stop-length": (dict(prompt="hi", stop=["q" * MAX_STOP_LEN]), dict(prompt="hi", stop=["q" * (MAX_STOP_LEN + 1)]),
                    "sampling.stop[0]"),
}


@pytest.mark.parametrize("ok,bad,field", list(LIMITS.values()), ids=list(LIMITS))
def test_limit(lclient, ok, bad, field):
    r = lclient.generate(**{"max_tokens": 2, "temperature": 0, **ok})
    assert r.token_ids
    with pytest.raises(InvalidArgument) as info:
        lclient.generate(**{"max_tokens": 2, **bad})
    assert info.value.field == field
    assert lclient.generate("still serving", max_tokens=2, temperature=0).token_ids


def _prefill_of_size(address: str, size: int) -> prefill_pb2.PrefillResponse:
    """A Prefill call whose request message is exactly `size` bytes (padded with cache_salt)."""
    req = prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=[1, 2, 3]), cache_salt="")
    n = size - req.ByteSize()
    while req.ByteSize() != size and n > 0:  # the salt's length prefix grows with it
        req.cache_salt = "s" * n
        n -= 1
    assert req.ByteSize() == size
    with grpc.insecure_channel(address) as ch:
        try:
            return prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(req, timeout=30)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def test_message_size(limited, lclient):
    from qwenpd.cache_store.client import CacheStoreClient

    response = _prefill_of_size(limited.prefill, MAX_MESSAGE)
    with CacheStoreClient(limited.cache) as store:
        store.delete(response.checkpoint_id)
    with pytest.raises(ResourceExhausted):
        _prefill_of_size(limited.prefill, MAX_MESSAGE + 1)
    with Client(prefill=limited.prefill, decode=limited.decode, timeout=10, max_message_bytes=1024) as small:
        with pytest.raises(ResourceExhausted):  # the client's own send limit
            small.generate("x" * 2000, max_tokens=1)
    assert lclient.generate("still serving", max_tokens=2, temperature=0).token_ids


def test_per_request_cache_budget(lclient):
    """A prompt adding exactly the budget is cached (its repeat restores 16 tokens); one adding more is served
    but not cached."""
    at = [11 + i for i in range(BLOCK + 4)]  # KV block 0 + snapshot at 16 == the budget
    past = [101 + i for i in range(2 * BLOCK + 4)]  # two KV blocks + a snapshot at 32
    for ids, cached in ((at, BLOCK), (past, 0)):
        first = lclient.generate(token_ids=ids, max_tokens=2, temperature=0)
        again = lclient.generate(token_ids=ids, max_tokens=2, temperature=0)
        assert first.token_ids == again.token_ids
        assert again.cached_tokens == cached


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[key] = s.value
    return out


def _settled(port: int, timeout: float = 10.0) -> dict[str, float]:
    """`_scrape` once the service's request counts stopped moving for 0.3 s: an earlier test's stream can still be
    leasing its resume point (on a loaded host, several test files run at once)."""
    def calls(m: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in m.items() if k.startswith("qwenpd_requests_total")}

    last, deadline = _scrape(port), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _scrape(port)
        if calls(now) == calls(last):
            return now
        last = now
    return last


def test_metrics_move_after_requests(limited, lclient):
    port = limited.metrics_port
    before = {name: _settled(port + i) for i, name in enumerate(("cache", "prefill", "decode"))}
    r = lclient.generate("count me", max_tokens=4, temperature=0, ignore_eos=True)
    with pytest.raises(InvalidArgument):
        lclient.generate("too many", max_tokens=MAX_NEW + 1)
    cache, prefill, decode = (_scrape(port + i) for i in range(3))

    def moved(after, name, key):
        return after.get(key, 0) - before[name].get(key, 0)

    ok = "qwenpd_requests_total,code=OK,method={},service={}"
    assert moved(prefill, "prefill", ok.format("Prefill", "prefill")) == 1
    assert moved(prefill, "prefill", "qwenpd_requests_total,code=INVALID_ARGUMENT,method=Prefill,service=prefill") == 1
    assert moved(prefill, "prefill", "qwenpd_prefill_ttft_seconds_count") == 1
    assert moved(prefill, "prefill", "qwenpd_prefill_queue_seconds_count") == 1
    assert moved(prefill, "prefill", "qwenpd_prompt_tokens_total") == r.prompt_tokens
    assert "qwenpd_prefill_queue_depth" in prefill
    assert moved(prefill, "prefill", "qwenpd_handoff_bytes_total") > 0
    assert moved(decode, "decode", ok.format("Decode", "decode")) == 1
    assert moved(decode, "decode", "qwenpd_output_tokens_total") == 4
    assert moved(decode, "decode", "qwenpd_decode_tpot_seconds_count") == 1
    assert moved(decode, "decode", "qwenpd_decode_queue_seconds_count") == 1
    assert moved(decode, "decode", "qwenpd_handoff_read_seconds_count") == 1
    assert moved(decode, "decode", "qwenpd_decode_batch_size_count") == 3  # 4 tokens: the first came from prefill
    assert decode["qwenpd_decode_active_sequences"] == 0 and "qwenpd_decode_queue_depth" in decode
    # the hand-off read, and (if the stream lasted long enough to take it) the lease on its resume point
    assert moved(cache, "cache", ok.format("AcquireLease", "cache_store")) in (1, 2)
    assert moved(cache, "cache", "qwenpd_cache_acquire_hits_total") in (1, 2)  # as AcquireLease above
    assert cache["qwenpd_cache_entries"] >= 0 and "qwenpd_cache_used_bytes" in cache
    assert "qwenpd_cache_prefix_hits_total" in cache


def test_decode_sampling_override_is_limited_too(limited, lclient):
    """Decode may override sampling: the same limits apply there (field named, checkpoint not left leased)."""
    from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc

    with grpc.insecure_channel(limited.prefill) as pch, grpc.insecure_channel(limited.decode) as dch:
        pre = prefill_pb2_grpc.PrefillServiceStub(pch).Prefill(
            prefill_pb2.PrefillRequest(text="override"), timeout=30)
        request = decode_pb2.DecodeRequest(checkpoint_id=pre.checkpoint_id,
                                           sampling=common_pb2.SamplingParams(max_tokens=MAX_NEW + 1))
        with pytest.raises(InvalidArgument) as info:
            try:
                list(decode_pb2_grpc.DecodeServiceStub(dch).Decode(request, timeout=30))
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
    assert info.value.field == "sampling.max_tokens"
    assert lclient.generate("still serving", max_tokens=2, temperature=0).token_ids


def test_resumed_prompt_counts_only_its_own_prompt_tokens(limited):
    """A resumed request (prompt + tokens generated before a decode failure) is held to the original prompt
    limit; the generated tokens count against max_tokens instead."""
    from qwenpd.cache_store.client import CacheStoreClient
    from qwenpd.protos.qwenpd.v1 import common_pb2

    generated = 5
    req = prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=[7] * MAX_PROMPT + [8] * generated),
                                     sampling=common_pb2.SamplingParams(max_tokens=MAX_NEW, seed=1),
                                     resume_generated=generated)
    with grpc.insecure_channel(limited.prefill) as ch:
        stub = prefill_pb2_grpc.PrefillServiceStub(ch)
        response = stub.Prefill(req, timeout=30)
        req.resume_generated = 0
        with pytest.raises(grpc.RpcError) as info:
            stub.Prefill(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with CacheStoreClient(limited.cache) as store:
        store.delete(response.checkpoint_id)
