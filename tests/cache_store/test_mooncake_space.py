"""The Store core on the mooncake backend: one object per entry, removed on eviction/abort/close, orphans of a
previous store with the same id removed at open. A local mooncake_master on 127.0.0.1; skips without mooncake."""

from __future__ import annotations

import pytest
import torch

from qwenpd.cache_store.checkpoint import CheckpointMeta, CheckpointWriter, read_checkpoint
from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.cache_store.index import Kind
from qwenpd.cache_store.store import Store
from qwenpd.errors import NotFound

KiB = 1 << 10


@pytest.fixture(scope="module")
def master():
    from qwenpd.cache_store.mooncake import available
    from qwenpd.cache_store.mooncake_master import MooncakeMaster, master_binary

    reason = available() or (None if master_binary() else "no mooncake_master binary")
    if reason:
        pytest.skip(f"mooncake backend unavailable: {reason}")
    with MooncakeMaster() as m:
        yield m


@pytest.fixture(scope="module")
def plane(master):
    from qwenpd.cache_store.mooncake import MooncakePlane

    p = MooncakePlane(master.address, master.metadata_url)
    yield p
    p.close()


def _store(master, store_id: str, budget: int = 256 * KiB) -> Store:
    store = Store(CacheStoreConfig(backend="mooncake", mooncake_master=master.address,
                                   mooncake_metadata=master.metadata_url, budget_bytes=budget, store_id=store_id))
    store.open()
    return store


def _put(store: Store, plane, value: float) -> tuple[str, str, int]:
    writer = CheckpointWriter({"x": torch.full((4000,), value)}, CheckpointMeta("fp", 1, {}))
    entry = store.allocate(Kind.CHECKPOINT, writer.nbytes)
    plane.write_many([writer], [entry.payload.extent.segment])
    store.commit(entry.entry_id, "fp", 1, {})
    return entry.entry_id, entry.payload.extent.segment, writer.nbytes


def test_roundtrip_eviction_and_close_remove_objects(master, plane):
    store = _store(master, "space1", budget=64 * KiB)
    try:
        first = _put(store, plane, 1.0)
        (buf,) = plane.read_many([first[1]], [first[2]])
        assert torch.equal(read_checkpoint(buf, "fp")[0]["x"], torch.full((4000,), 1.0))
        for i in range(8):  # 16 KiB each: the budget evicts the oldest
            last = _put(store, plane, float(i))
        assert store.stats().index.evictions > 0
        with pytest.raises(NotFound):
            plane.read_many([first[1]], [first[2]])
        prev = _put(store, plane, 7.5)
        a, b, c = plane.read_many([last[1], prev[1], last[1]], [last[2], prev[2], last[2]])  # one batch get
        assert read_checkpoint(a, "fp")[0]["x"][0] == 7.0 and read_checkpoint(b, "fp")[0]["x"][0] == 7.5
        assert bytes(a) == bytes(c)
    finally:
        store.close()
    with pytest.raises(NotFound):
        plane.read_many([last[1]], [last[2]])


def test_restarted_store_removes_its_orphans(master, plane):
    crashed = _store(master, "space2")
    _, key, size = _put(crashed, plane, 2.0)
    successor = Store(CacheStoreConfig(backend="mooncake", mooncake_master=master.address,
                                       mooncake_metadata=master.metadata_url, store_id="space2"))
    try:
        assert successor.open() != []
        with pytest.raises(NotFound):
            plane.read_many([key], [size])
    finally:
        successor.close()
        crashed.close()
