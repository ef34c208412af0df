"""Prefix-cache bookkeeping: block keys, snapshot positions, shared entries, lookup, lifetimes, client parts."""

from __future__ import annotations

import pytest
import torch

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient, SharedItem
from qwenpd.cache_store.index import Kind
from qwenpd.prefill_service.prefix_policy import PrefixPolicy, block_keys
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb
from tests.cache_store.conftest import STATE_DTYPES, state_shapes, state_tensors
from tests.cache_store.test_store import Clock, open_store

MiB = 1 << 20


def test_block_keys_chain_salt_and_model():
    toks = list(range(1000))
    a = block_keys("fp", None, toks, 256)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_keys("fp", None, toks[:600], 256) == a[:2]  # a key names the whole prefix before it
    assert block_keys("fp", "tenant-a", toks, 256)[0] != a[0]
    assert block_keys("fp2", None, toks, 256)[0] != a[0]
    changed = toks[:]
    changed[10] += 1
    assert all(x != y for x, y in zip(block_keys("fp", None, changed, 256), a))


@pytest.mark.parametrize("n,expected", [(1, []), (256, []), (257, [256]), (4096, [2048, 3840]),
                                        (4097, [2048, 4096]), (5000, [2048, 4096, 4864])])
def test_snapshot_positions(n, expected):
    assert PrefixPolicy(256, 2048).snapshot_positions(n) == expected
    assert all(p < n for p in expected)  # at least one token is always computed


def test_policy_validation():
    with pytest.raises(ValueError, match="multiple of block_size"):
        PrefixPolicy(256, 300)
    with pytest.raises(ValueError, match="block_size"):
        PrefixPolicy(0, 0)


def _shared(store, kind, key, size=MiB // 4, tokens=256):
    entry = store.allocate(kind, size)
    return store.commit_shared(entry.entry_id, kind, key, "fp", tokens)


def test_lookup_longest_prefix_with_snapshot(store_id):
    store = open_store(store_id, budget_bytes=16 * MiB, segment_bytes=0)
    try:
        kv = [_shared(store, Kind.KV_BLOCK, k) for k in ("a", "b", "c")]
        _shared(store, Kind.SNAPSHOT, "a", tokens=256)
        _shared(store, Kind.SNAPSHOT, "b", tokens=512)
        hit = store.lookup("fp", ["a", "b", "c", "d"], ttl_s=10)
        assert hit.blocks == 2 and hit.num_tokens == 512 and [e.entry_id for e in hit.kv_blocks] == kv
        assert len(hit.lease_ids) == 4  # 3 KV blocks + the snapshot are pinned while read
        assert store.lookup("other-model", ["a"], 10).blocks == 0
        assert store.lookup("fp", ["x", "b"], 10).blocks == 0  # chain broken at block 0
        store.release_many(hit.lease_ids)
        c = store.stats().prefix
        assert (c.hits, c.misses, c.hit_tokens) == (1, 2, 512)
    finally:
        store.close()


def test_duplicate_key_keeps_first_and_frees_second(store_id):
    store = open_store(store_id, budget_bytes=16 * MiB, segment_bytes=0)
    try:
        first = _shared(store, Kind.KV_BLOCK, "a")
        used = store.index.used_bytes
        assert _shared(store, Kind.KV_BLOCK, "a") == first
        assert store.index.used_bytes == used
    finally:
        store.close()


def test_referenced_blocks_survive_eviction_then_become_lru(store_id):
    clock = Clock()
    store = open_store(store_id, clock, budget_bytes=2 * MiB, segment_bytes=0)
    try:
        block = _shared(store, Kind.KV_BLOCK, "a", size=MiB // 2)
        entry = store.allocate(Kind.CHECKPOINT, MiB // 2)
        ckpt, _ = store.commit(entry.entry_id, "fp", 300, {}, [block], 100.0)  # pinned for its reader
        for key in "bcd":  # fill the budget: only unreferenced entries may go
            _shared(store, Kind.KV_BLOCK, key, size=MiB // 2)
        assert store.index.peek(block) is not None
        store.delete(ckpt.entry_id)  # the checkpoint goes: its block is an ordinary LRU entry again
        _shared(store, Kind.KV_BLOCK, "e", size=MiB // 2)  # fills the room the checkpoint left
        assert store.index.peek(block) is not None
        _shared(store, Kind.KV_BLOCK, "f", size=MiB // 2)  # a is now the least recently used
        assert store.index.peek(block) is None and "kv_block:a" not in store.prefix
        assert store.lookup("fp", ["a"], 10).kv_blocks == []
    finally:
        store.close()


def test_client_put_shared_lookup_and_multipart_checkpoint(store):
    """Through a real store process: blocks + snapshot cached, a checkpoint referencing two blocks reads back
    as one state with K/V concatenated in prefix order."""
    whole = state_tensors(seed=1, tokens=10)
    blocks = [{n: t[:, i * 4:(i + 1) * 4].contiguous() for n, t in whole.items() if n.endswith((".k", ".v"))}
              for i in range(2)]
    own = {n: (t[:, 8:].contiguous() if n.endswith((".k", ".v")) else t) for n, t in whole.items()}
    snap = {n: t for n, t in whole.items() if not n.endswith((".k", ".v"))}
    with CacheStoreClient(store.address) as client:
        items = [SharedItem(pb.ENTRY_KIND_KV_BLOCK, "a0", blocks[0], 4),
                 SharedItem(pb.ENTRY_KIND_KV_BLOCK, "a1", blocks[1], 8),
                 SharedItem(pb.ENTRY_KIND_SNAPSHOT, "a1", snap, 8)]
        ids = client.put_shared(items, "fp")
        assert client.stats().leases == 0
        hit = client.lookup_prefix("fp", ["a0", "a1"])
        assert hit.blocks == 2 and hit.num_tokens == 8 and hit.kv_ids == ids[:2]
        assert torch.equal(hit.kv[1]["layers.3.k"], blocks[1]["layers.3.k"])
        assert torch.equal(hit.snapshot["layers.0.recurrent"], snap["layers.0.recurrent"])
        client.release_leases(hit.lease_ids)
        ckpt_id = client.put_checkpoint(own, CheckpointMeta("fp", 10, {}), refs=ids[:2])
        with client.checkpoint(ckpt_id, "fp", state_shapes, STATE_DTYPES) as ckpt:
            for name, t in whole.items():
                assert torch.equal(ckpt.tensors[name], t), name
        # the same in one go: new block a1b published with the checkpoint that references a0 + a1b
        ckpt_id = client.put_prefix_checkpoint([SharedItem(pb.ENTRY_KIND_KV_BLOCK, "a1b", blocks[1], 8)], own,
                                               CheckpointMeta("fp", 10, {}), ids[:1], 1)
        with client.checkpoint(ckpt_id, "fp", state_shapes, STATE_DTYPES) as ckpt:
            assert all(torch.equal(ckpt.tensors[n], t) for n, t in whole.items())
        assert client.stats().leases == 0
        stats = client.stats()
        assert stats.prefix_hits == 1 and stats.prefix_hit_tokens == 8


def test_async_client_has_the_prefix_calls(store):
    """AsyncCacheStoreClient offers the same calls (the blocking client wraps it): blocks + snapshot cached,
    looked up, and a prefix checkpoint referencing a block reads back whole."""
    import asyncio

    from qwenpd.cache_store.client import AsyncCacheStoreClient

    whole = state_tensors(seed=2, tokens=8)
    block = {n: t[:, :4].contiguous() for n, t in whole.items() if n.endswith((".k", ".v"))}
    own = {n: (t[:, 4:].contiguous() if n.endswith((".k", ".v")) else t) for n, t in whole.items()}
    snap = {n: t for n, t in whole.items() if not n.endswith((".k", ".v"))}

    async def main() -> None:
        async with AsyncCacheStoreClient(store.address) as client:
            ids = await client.put_shared([SharedItem(pb.ENTRY_KIND_KV_BLOCK, "a0", block, 4),
                                           SharedItem(pb.ENTRY_KIND_SNAPSHOT, "a0", snap, 4)], "fp-async")
            hit = await client.lookup_prefix("fp-async", ["a0", "a1"])
            assert hit.blocks == 1 and hit.num_tokens == 4 and hit.kv_ids == ids[:1]
            assert torch.equal(hit.snapshot["layers.0.recurrent"], snap["layers.0.recurrent"])
            await client.release_leases(hit.lease_ids)
            ckpt_id = await client.put_prefix_checkpoint([], own, CheckpointMeta("fp-async", 8, {}), ids[:1], 0)
            async with client.checkpoint(ckpt_id, "fp-async", state_shapes, STATE_DTYPES) as ckpt:
                assert all(torch.equal(ckpt.tensors[n], t) for n, t in whole.items())
            assert (await client.stats()).leases == 0

    asyncio.run(main())


def test_blocking_and_async_clients_offer_the_same_calls():
    import inspect

    from qwenpd.cache_store.client import AsyncCacheStoreClient

    def calls(cls: type) -> dict[str, list[str]]:
        return {name: list(inspect.signature(fn).parameters) for name, fn in vars(cls).items()
                if callable(fn) and not name.startswith("_")}

    assert calls(CacheStoreClient) == calls(AsyncCacheStoreClient)
