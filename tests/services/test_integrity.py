"""Integrity on the real services: checkpoint bytes corrupted in shared memory between prefill and decode give
DATA_LOSS for that request while the services keep serving; random and malformed Prefill/Decode requests
(hypothesis) always end in a clean status, never a crash, an INTERNAL/UNKNOWN or a hang."""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenpd.clients.errors import DataLoss, from_rpc_error
from qwenpd.protos.qwenpd.v1 import (cache_store_pb2, cache_store_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc,
                                     prefill_pb2, prefill_pb2_grpc)
from tests.services.conftest import SHM_DIR, quiet

CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}


@pytest.fixture(scope="module")
def stubs(services):
    channels = [grpc.insecure_channel(a) for a in (services.prefill, services.decode, services.cache)]
    yield (prefill_pb2_grpc.PrefillServiceStub(channels[0]), decode_pb2_grpc.DecodeServiceStub(channels[1]),
           cache_store_pb2_grpc.CacheStoreStub(channels[2]))
    for ch in channels:
        ch.close()


def _counts(store) -> tuple[int, int, int]:
    s = store.stats()
    return s.leases, s.entries, s.allocations


def _settle(store, before: tuple[int, int, int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _counts(store) != before:
        assert time.monotonic() < deadline, f"store {_counts(store)} != {before} before the test"
        time.sleep(0.05)


def _decode(stub, checkpoint_id: str, **sampling) -> list[decode_pb2.DecodeChunk]:
    request = decode_pb2.DecodeRequest(checkpoint_id=checkpoint_id)
    if sampling:
        request.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return list(stub.Decode(request, timeout=30))


@pytest.mark.parametrize("where", ["tensor-data", "header"])
def test_corrupt_checkpoint_bytes_are_data_loss_and_others_still_served(stubs, store, client, where):
    prefill, decode, cache = stubs
    before = quiet(lambda: _counts(store))
    pre = prefill.Prefill(prefill_pb2.PrefillRequest(text=f"corrupt {where}", cache_salt=f"integrity-{where}",
                                                     sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=30)
    lease = cache.AcquireLease(cache_store_pb2.AcquireLeaseRequest(checkpoint_id=pre.checkpoint_id), timeout=10)
    cache.ReleaseLease(cache_store_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=10)
    own = lease.parts[-1].segment
    at = own.offset + (own.length - 64 if where == "tensor-data" else 12)
    with open(SHM_DIR / own.name, "r+b") as f:
        f.seek(at)
        good = f.read(8)
        f.seek(at)
        f.write(bytes(b ^ 0x5A for b in good))
    with pytest.raises(grpc.RpcError) as info:
        _decode(decode, pre.checkpoint_id)
    assert isinstance(from_rpc_error(info.value), DataLoss), info.value
    r = client.generate("still serving", max_tokens=3, temperature=0, ignore_eos=True)
    assert len(r.token_ids) == 3
    _settle(store, before)  # the corrupt checkpoint is gone, nothing stays leased


_u32 = st.integers(0, 2**32 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0])
_text = st.text(max_size=40)


@st.composite
def sampling_params(draw, max_tokens=st.integers(0, 2**32 - 1)) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(top_k=draw(_u32), ignore_eos=draw(st.booleans()),
                                   stop=draw(st.lists(_text, max_size=3)),
                                   stop_token_ids=draw(st.lists(_u32, max_size=3)))
    for name, strategy in (("temperature", _floats), ("top_p", _floats), ("seed", st.integers(0, 2**64 - 1)),
                           ("max_tokens", max_tokens)):
        value = draw(st.none() | strategy)
        if value is not None:
            setattr(pb, name, value)
    return pb


@st.composite
def prefill_requests(draw) -> prefill_pb2.PrefillRequest:
    req = prefill_pb2.PrefillRequest(request_id=draw(_text), return_prompt_token_ids=draw(st.booleans()))
    kind = draw(st.sampled_from(["none", "text", "token_ids", "chat"]))
    if kind == "text":
        req.text = draw(_text)
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, 600) | _u32, max_size=24)))
    elif kind == "chat":
        req.chat.messages.extend(common_pb2.ChatMessage(role=draw(st.sampled_from(["user", "system", "bogus", ""])),
                                                        content=draw(_text))
                                 for _ in range(draw(st.integers(0, 3))))
        if draw(st.booleans()):
            req.chat.enable_thinking = draw(st.booleans())
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(sampling_params()))
    if draw(st.booleans()):
        req.cache_salt = draw(_text)
    if draw(st.booleans()):
        req.resume_generated = draw(st.integers(0, 30) | _u32)
    return req


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def test_random_prefill_requests_get_a_clean_status(stubs, store):
    prefill = stubs[0]
    before = quiet(lambda: _counts(store))

    @FUZZ
    @given(prefill_requests())
    def check(request: prefill_pb2.PrefillRequest) -> None:
        try:
            response = prefill.Prefill(request, timeout=30)
        except grpc.RpcError as err:
            assert err.code() in CLEAN, (err.code(), err.details(), request)
        else:
            store.delete(response.checkpoint_id)

    check()
    _settle(store, before)


@st.composite
def decode_requests(draw, real_ids: list[str]) -> decode_pb2.DecodeRequest:
    req = decode_pb2.DecodeRequest(request_id=draw(_text),
                                   checkpoint_id=draw(st.sampled_from(real_ids + ["", "x" * 32]) | _text))
    if draw(st.booleans()):  # bounded, so that a valid request finishes quickly
        req.sampling.CopyFrom(draw(sampling_params(max_tokens=st.integers(0, 6))))
        if not req.sampling.HasField("max_tokens"):
            req.sampling.max_tokens = 3
    return req


def test_random_decode_requests_get_a_clean_status(stubs, store):
    prefill, decode, _ = stubs
    before = quiet(lambda: _counts(store))
    made: list[str] = []

    def fresh() -> str:
        pre = prefill.Prefill(prefill_pb2.PrefillRequest(text="fuzz decode",
                                                         sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=30)
        made.append(pre.checkpoint_id)
        return pre.checkpoint_id

    @FUZZ
    @given(st.data())
    def check(data) -> None:
        request = data.draw(decode_requests([fresh()]))
        try:
            chunks = list(decode.Decode(request, timeout=30))
        except grpc.RpcError as err:
            assert err.code() in CLEAN, (err.code(), err.details(), request)
        else:
            assert chunks[-1].HasField("finish_reason")

    check()
    for checkpoint_id in made:  # those the fuzzer did not decode
        try:
            store.delete(checkpoint_id)
        except Exception:  # noqa: BLE001 - decoded ones are gone already
            pass
    _settle(store, before)
