"""The hybrid prefix cache through real services: KV blocks and DeltaNet snapshots reused across requests,
every output token-identical to a cold in-process run (itself checked against transformers elsewhere)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.clients import Client
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from tests.services.conftest import BACKENDS, backend_flags, segments, start_serve_all, stop_serve_all

BLOCK, INTERVAL = 16, 64
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


def cold(engine, ids, **kw):
    return generate(engine, ids, SamplingParams(**kw)).token_ids


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _start(tiny_model_dir, tmp_path_factory, name, *extra):
    return start_serve_all(tiny_model_dir, tmp_path_factory.mktemp(name), f"{name}{os.getpid()}",
                           "--block-size", str(BLOCK), "--snapshot-interval", str(INTERVAL), *extra)


@pytest.fixture(scope="module", params=BACKENDS)
def cached(request, tiny_model_dir, tmp_path_factory):
    s = _start(tiny_model_dir, tmp_path_factory, f"prefix_{request.param}", *backend_flags(request.param))
    with Client(prefill=s.prefill, decode=s.decode, timeout=60) as c, CacheStoreClient(s.cache) as store:
        yield c, store
    assert stop_serve_all(s) == 0
    assert segments(s.store_id) == []


def test_exact_repeat_reuses_all_but_the_last_block(cached, engine):
    client, store = cached
    ids = _ids(150, seed=1)
    first = client.generate(token_ids=ids, **GREEDY)
    second = client.generate(token_ids=ids, **GREEDY)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 144  # the last block boundary strictly inside the prompt
    assert second.token_ids == first.token_ids == cold(engine, ids, **GREEDY)


def test_shared_system_prompt_partial_reuse(cached, engine):
    client, _ = cached
    system = _ids(100, seed=2)
    a, b = system + _ids(35, seed=3), system + _ids(20, seed=4)
    ra = client.generate(token_ids=a, **GREEDY)
    rb = client.generate(token_ids=b, **GREEDY)
    # a snapshotted at 64 (interval) and 128 (last boundary inside); b shares blocks 0..5 (96 tokens) with a,
    # so the usable hit is the snapshot at 64
    assert (ra.cached_tokens, rb.cached_tokens) == (0, 64)
    assert ra.token_ids == cold(engine, a, **GREEDY)
    assert rb.token_ids == cold(engine, b, **GREEDY)
    # b found KV cached up to 96 (where it left a's chain) but a snapshot only at 64, so it snapshotted at 96:
    # the next question on the same system prompt reuses all 96 shared tokens
    c = system + _ids(30, seed=5)
    rc = client.generate(token_ids=c, **GREEDY)
    assert rc.cached_tokens == 96 and rc.token_ids == cold(engine, c, **GREEDY)
    d = b[:112] + _ids(9, seed=6)
    rd = client.generate(token_ids=d, **GREEDY)
    assert rd.cached_tokens == 112 and rd.token_ids == cold(engine, d, **GREEDY)


def test_prefix_shorter_than_one_block_is_never_a_hit(cached, engine):
    client, _ = cached
    ids = _ids(BLOCK, seed=7)  # exactly one block: no boundary strictly inside
    for _ in range(2):
        r = client.generate(token_ids=ids, **GREEDY)
        assert r.cached_tokens == 0 and r.token_ids == cold(engine, ids, **GREEDY)


def test_cache_salt_isolates_tenants(cached, engine):
    client, _ = cached
    ids = _ids(90, seed=8)
    assert client.generate(token_ids=ids, cache_salt="tenant-a", **GREEDY).cached_tokens == 0
    other = client.generate(token_ids=ids, cache_salt="tenant-b", **GREEDY)
    unsalted = client.generate(token_ids=ids, **GREEDY)
    again = client.generate(token_ids=ids, cache_salt="tenant-a", **GREEDY)
    assert (other.cached_tokens, unsalted.cached_tokens, again.cached_tokens) == (0, 0, 80)
    assert other.token_ids == unsalted.token_ids == again.token_ids == cold(engine, ids, **GREEDY)


def test_eight_concurrent_requests_sharing_a_prefix(cached, engine):
    client, store = cached
    shared = _ids(128, seed=9)
    prompts = [shared + _ids(10 + i, seed=100 + i) for i in range(8)]
    hits_before = store.stats().prefix_hits
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: client.generate(token_ids=p, **GREEDY), prompts))
    for p, r in zip(prompts, results):
        assert r.token_ids == cold(engine, p, **GREEDY)
    # prefill runs them one at a time: whichever went first paid for the prefix, the rest reused it
    assert sorted(r.cached_tokens for r in results) == [0] + [128] * 7
    assert store.stats().prefix_hits - hits_before == 7


def test_prefix_reused_under_a_different_sampling_config(cached, engine):
    client, _ = cached
    ids = _ids(120, seed=11)
    client.generate(token_ids=ids, **GREEDY)
    sampled = dict(temperature=0.8, top_p=0.9, top_k=50, seed=5, max_tokens=12, ignore_eos=True)
    r = client.generate(token_ids=ids, **sampled)
    assert r.cached_tokens == 112 and r.token_ids == cold(engine, ids, **sampled)


def test_blocks_are_stored_once(cached):
    client, store = cached
    ids = _ids(200, seed=12)
    client.generate(token_ids=ids, **GREEDY)
    before = {k.kind: k.entries for k in store.stats().by_kind}
    client.generate(token_ids=ids + _ids(40, seed=13), **GREEDY)
    after = {k.kind: k.entries for k in store.stats().by_kind}
    # 200 -> 12 full blocks; 240 -> 15: only the 3 new blocks are written, the first 12 are shared
    from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb

    assert after[pb.ENTRY_KIND_KV_BLOCK] - before[pb.ENTRY_KIND_KV_BLOCK] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_eviction_under_a_tiny_budget_stays_correct(tiny_model_dir, tmp_path_factory, engine, backend):
    s = _start(tiny_model_dir, tmp_path_factory, f"evict_{backend}", "--budget", "256KiB", *backend_flags(backend))
    try:
        with Client(prefill=s.prefill, decode=s.decode, timeout=60) as client, CacheStoreClient(s.cache) as store:
            prompts = [_ids(150, seed=200 + i) for i in range(6)]
            for p in prompts + prompts[:2]:
                assert client.generate(token_ids=p, **GREEDY).token_ids == cold(engine, p, **GREEDY)
            stats = store.stats()
            assert stats.evictions > 0 and stats.used_bytes <= stats.budget_bytes
    finally:
        assert stop_serve_all(s) == 0
    assert segments(s.store_id) == []
