"""The cache store as a real process on 127.0.0.1 port 0, used by real client processes."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import AsyncCacheStoreClient, CacheStoreClient
from qwenpd.cache_store.shm import SEGMENT_NAME_RE
from qwenpd.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb
from qwenpd.protos.qwenpd.v1 import cache_store_pb2_grpc as pb_grpc
from tests.cache_store.conftest import (REPO, SHM, STATE_DTYPES, leftover_files, segment_files, state_shapes,
                                        state_tensors)

FP = "test-fingerprint"


def peer(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "tests.cache_store._peer", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def put(client: CacheStoreClient, seed: int = 0, tokens: int = 7, **kw) -> str:
    return client.put_checkpoint(state_tensors(seed, tokens), CheckpointMeta(FP, tokens), **kw)


def raw_status(call, request):
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=5)
    details = {}
    for a in rpc_status.from_call(e.value).details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                    error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
            if a.Is(cls.DESCRIPTOR):
                details[cls.__name__] = cls()
                a.Unpack(details[cls.__name__])
    return e.value.code(), details


def test_put_in_one_process_get_in_another(store) -> None:
    cid, put_digest = peer("put", store.address, "3", "9")
    verdict, get_digest = peer("get", store.address, cid, "3", "9")
    assert verdict == "equal" and get_digest == put_digest
    with CacheStoreClient(store.address) as client, pytest.raises(NotFound):  # the reader deleted it
        client.get_checkpoint(cid, "peer-fingerprint")


def test_segments_are_private_random_and_removed_on_sigterm(store) -> None:
    with CacheStoreClient(store.address) as client:
        big = {"x": torch.zeros(3 << 20, dtype=torch.uint8)}  # 3 MiB: fills most of a 4 MiB pooled segment
        ids = [client.put_checkpoint(big, CheckpointMeta(FP, 0)) for _ in range(2)]
        files = segment_files(store.store_id)
        assert len(files) == 2 and files[0].name != files[1].name
        for f in files:
            assert SEGMENT_NAME_RE.match(f.name) and stat.S_IMODE(f.stat().st_mode) == 0o600
            assert f.name.startswith(f"qwenpd-{store.store_id}-")
        assert client.stats().segments == 2 and len(ids) == 2
    assert store.stop(signal.SIGTERM) == 0
    assert leftover_files(store.store_id) == []


def test_exact_segments_are_removed_on_release_and_eviction(store_factory) -> None:
    s = store_factory(None, "--budget", "1MiB", "--segment-size", "0")
    with CacheStoreClient(s.address) as client:
        first = put(client, handoff_ttl_s=0)
        assert len(segment_files(s.store_id)) == 1
        with client.checkpoint(first, FP, state_shapes, STATE_DTYPES, delete=True):
            pass
        assert segment_files(s.store_id) == []
        blob = {"x": torch.zeros(300 << 10, dtype=torch.uint8)}
        names_seen = set()
        for _ in range(8):  # 8 x 300 KiB through a 1 MiB budget: older ones are evicted with their segments
            client.put_checkpoint(blob, CheckpointMeta(FP, 0), handoff_ttl_s=0)
            names = {f.name for f in segment_files(s.store_id)}
            assert len(names) <= 3
            names_seen |= names
        assert len(names_seen) == 8
        assert client.stats().evictions == 5


def test_orphans_are_removed_by_a_restarted_store(store_factory, store_id) -> None:
    first = store_factory(store_id, "--budget", "8MiB", "--segment-size", "0")
    with CacheStoreClient(first.address) as client:
        put(client)
    orphans = segment_files(store_id)
    assert len(orphans) == 1
    first.stop(signal.SIGKILL)
    assert all(p.exists() for p in orphans)
    second = store_factory(store_id, "--budget", "8MiB", "--segment-size", "0")
    assert not any(p.exists() for p in orphans)
    with CacheStoreClient(second.address) as client:
        cid = put(client)
        with client.checkpoint(cid, FP, state_shapes, STATE_DTYPES) as ckpt:
            assert ckpt.num_tokens == 7
    assert second.stop() == 0
    assert leftover_files(store_id) == []


def test_a_store_id_has_one_live_owner(store) -> None:
    dup = subprocess.run([sys.executable, "-m", "qwenpd.cache_store", "--listen", "127.0.0.1:0", "--store-id", store.store_id],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert dup.returncode == 1 and "another live cache store" in dup.stderr


def test_unknown_and_stale_ids_are_not_found(store) -> None:
    with CacheStoreClient(store.address) as client:
        with pytest.raises(NotFound):
            client.get_checkpoint("0" * 32, FP)
        cid = put(client)
        client.delete(cid)
        with pytest.raises(NotFound) as e:
            client.get_checkpoint(cid, FP)
        assert e.value.resource_name == cid and e.value.resource_type == "checkpoint"
        with pytest.raises(NotFound):
            client.release("no-such-lease")
        with pytest.raises(NotFound):
            client.delete(cid)
        assert client.stats().acquire_misses == 2
    stub = pb_grpc.CacheStoreStub(grpc.insecure_channel(store.address))
    code, details = raw_status(stub.AcquireLease, pb.AcquireLeaseRequest(checkpoint_id="x" * 32))
    assert code == grpc.StatusCode.NOT_FOUND and details["ResourceInfo"].resource_name == "x" * 32
    code, _ = raw_status(stub.CommitCheckpoint, pb.CommitCheckpointRequest(entry_id="y" * 32, fingerprint=FP))
    assert code == grpc.StatusCode.NOT_FOUND


def test_model_mismatch_is_failed_precondition(store) -> None:
    with CacheStoreClient(store.address) as client:
        cid = put(client)
        with pytest.raises(FailedPrecondition, match="written for model"):
            client.get_checkpoint(cid, "another-model")
        with pytest.raises(FailedPrecondition, match="shape"):
            client.get_checkpoint(cid, FP, state_shapes(8))
        # the store refused the first read before leasing; the second was leased (ending the hand-off pin),
        # failed in the client, and was released
        s = client.stats()
        assert (s.leases, s.acquire_hits) == (0, 1)


def test_full_store_is_resource_exhausted_with_quota_and_retry(store_factory) -> None:
    s = store_factory(None, "--budget", "64KiB", "--segment-size", "0")
    with CacheStoreClient(s.address) as client:
        blob = {"x": torch.zeros(40 << 10, dtype=torch.uint8)}
        client.put_checkpoint(blob, CheckpointMeta(FP, 0))  # pinned for its reader
        with pytest.raises(ResourceExhausted) as e:
            client.put_checkpoint(blob, CheckpointMeta(FP, 0))
        assert e.value.retry_after_s is not None and e.value.subject == "cache_store.budget_bytes"
        assert client.stats().allocations == 0
    stub = pb_grpc.CacheStoreStub(grpc.insecure_channel(s.address))
    code, details = raw_status(stub.AllocateSegment, pb.AllocateSegmentRequest(
        size_bytes=40 << 10, kind=pb.ENTRY_KIND_CHECKPOINT))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert {"QuotaFailure", "RetryInfo", "ErrorInfo"} <= set(details)
    assert details["ErrorInfo"].reason == "CACHE_FULL" and details["ErrorInfo"].domain == "qwenpd"


def test_bad_requests_are_invalid_argument_with_field(store) -> None:
    stub = pb_grpc.CacheStoreStub(grpc.insecure_channel(store.address))
    code, details = raw_status(stub.AllocateSegment, pb.AllocateSegmentRequest(size_bytes=0,
                                                                               kind=pb.ENTRY_KIND_CHECKPOINT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "size_bytes"
    code, details = raw_status(stub.AcquireLease, pb.AcquireLeaseRequest(checkpoint_id="a", ttl_ns=0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details["BadRequest"].field_violations[0].field == "ttl_ns"
    with CacheStoreClient(store.address) as client, pytest.raises(InvalidArgument) as e:
        client.get_checkpoint("", FP)
    assert e.value.field == "checkpoint_id"


def test_health_and_reflection(store) -> None:
    channel = grpc.insecure_channel(store.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "qwenpd.v1.CacheStore"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"qwenpd.v1.CacheStore", "grpc.health.v1.Health"} <= names


def test_expired_lease_is_reported_as_data_loss(store) -> None:
    with CacheStoreClient(store.address) as client:
        cid = put(client)
        with pytest.raises(DataLoss, match="lease expired"):
            with client.checkpoint(cid, FP, ttl_s=0.05):
                time.sleep(0.3)
        assert client.stats().expired_leases == 1


def test_async_client_round_trip(store) -> None:
    async def main() -> None:
        async with AsyncCacheStoreClient(store.address) as client:
            big = {"x": torch.arange(1 << 19, dtype=torch.float32)}  # 2 MiB: the copies run off the loop
            cid = await client.put_checkpoint(big, CheckpointMeta(FP, 5, {"a": "b"}))
            async with client.checkpoint(cid, FP, delete=True) as ckpt:
                assert torch.equal(ckpt.tensors["x"], big["x"]) and ckpt.metadata == {"a": "b"}
            with pytest.raises(NotFound):
                await client.get_checkpoint(cid, FP)
            stats = await client.stats()
            assert stats.entries == 0 and stats.acquire_hits == 1

    asyncio.run(main())


def test_stats_track_usage(store) -> None:
    with CacheStoreClient(store.address) as client:
        a, b = put(client), put(client, handoff_ttl_s=0)
        s = client.stats()
        assert (s.entries, s.leases, s.allocations, s.segments) == (2, 1, 0, 1)
        assert s.used_bytes == 2 * s.pinned_bytes > 0 and s.used_bytes % 4096 == 0 and s.budget_bytes == 64 << 20
        assert s.by_kind[0].kind == pb.ENTRY_KIND_CHECKPOINT and s.by_kind[0].entries == 2
        info = client.info()
        assert info.store_id == store.store_id and info.shm_dir == str(SHM) and info.lease_ttl_ns == 60 * 10**9
        del a, b


def test_shared_entries_need_hex_keys_and_sizes_are_reported_as_asked(store) -> None:
    """CommitShared refuses a prefix_key that is not hex (naming it) before publishing any entry; a size too large
    for the budget is reported as the caller gave it, not as the store rounded it up; request bytes that do not
    parse are INVALID_ARGUMENT here too."""
    stub = pb_grpc.CacheStoreStub(grpc.insecure_channel(store.address))
    good = stub.AllocateSegment(pb.AllocateSegmentRequest(size_bytes=100, kind=pb.ENTRY_KIND_KV_BLOCK), timeout=5)
    bad = stub.AllocateSegment(pb.AllocateSegmentRequest(size_bytes=100, kind=pb.ENTRY_KIND_KV_BLOCK), timeout=5)
    code, details = raw_status(stub.CommitShared, pb.CommitSharedRequest(entries=[
        pb.SharedEntry(entry_id=good.entry_id, kind=pb.ENTRY_KIND_KV_BLOCK, prefix_key="ab12", fingerprint=FP),
        pb.SharedEntry(entry_id=bad.entry_id, kind=pb.ENTRY_KIND_KV_BLOCK, prefix_key="zz-not-hex",
                       fingerprint=FP)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["BadRequest"].field_violations[0].field == "entries[1].prefix_key"
    assert stub.GetStats(pb.GetStatsRequest(), timeout=5).allocations == 2  # neither was published
    code, _ = raw_status(stub.AllocateSegment, pb.AllocateSegmentRequest(size_bytes=2**64 - 1,
                                                                         kind=pb.ENTRY_KIND_CHECKPOINT))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        stub.AllocateSegment(pb.AllocateSegmentRequest(size_bytes=2**64 - 1, kind=pb.ENTRY_KIND_CHECKPOINT),
                             timeout=5)
    assert e.value.details().startswith("18446744073709551615 bytes (18446744073709551616 once rounded up) exceed")
    raw = pb.AcquireLeaseRequest(checkpoint_id="aXb").SerializeToString().replace(b"X", b"\xff\xfe")
    with pytest.raises(grpc.RpcError) as e:
        grpc.insecure_channel(store.address).unary_unary("/qwenpd.v1.CacheStore/AcquireLease")(raw, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "the request is not a valid qwenpd.v1.AcquireLeaseRequest message: String field " \
        "had bad UTF-8"
