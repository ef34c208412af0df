"""The mooncake data plane when Mooncake itself fails: a dead master gives UNAVAILABLE (never a hang or wrong
tokens), the services keep serving, and after the master restarts the store's objects are gone (prefix
entries become misses, old checkpoints NOT_FOUND) and new requests work again. Loopback only."""

from __future__ import annotations

import os
import time

import pytest
import torch

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.clients import Client
from qwenpd.clients.errors import NotFound, QwenpdError, Unavailable
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from tests.services.conftest import mooncake_skip_reason, start_serve_all, stop_serve_all

GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def master():
    reason = mooncake_skip_reason()
    if reason:
        pytest.skip(reason)
    from qwenpd.cache_store.mooncake_master import MooncakeMaster

    m = MooncakeMaster().start()
    yield m
    m.close()


def test_missing_master_is_a_clear_error_not_a_hang(tmp_path):
    from qwenpd.cache_store.mooncake import connect

    if mooncake_skip_reason():
        pytest.skip(mooncake_skip_reason())
    start = time.monotonic()
    with pytest.raises(Unavailable, match="unreachable"):
        connect("127.0.0.1:1", "http://127.0.0.1:1/metadata")
    assert time.monotonic() - start < 5


def test_master_death_and_restart(master, tiny_model_dir, tmp_path, engine):
    s = start_serve_all(tiny_model_dir, tmp_path, f"mck{os.getpid()}", "--backend", "mooncake", "--mooncake-master",
                        master.address, "--metadata", master.metadata_url, "--block-size", "16",
                        "--snapshot-interval", "64")
    try:
        ids = engine.tokenizer.encode("Once upon a time there was a small model that wanted to answer. " * 3)
        want = generate(engine, ids, SamplingParams(**GREEDY)).token_ids
        with Client(prefill=s.prefill, decode=s.decode, timeout=30) as client, CacheStoreClient(s.cache) as store:
            assert client.generate(token_ids=ids, **GREEDY).token_ids == want  # fills the prefix cache
            meta = CheckpointMeta("fp", 1, {})
            old = store.put_checkpoint({"x": torch.ones(1000)}, meta, handoff_ttl_s=0)
            master.kill()
            start = time.monotonic()
            with pytest.raises(Unavailable):
                store.put_checkpoint({"x": torch.ones(1000)}, meta)
            assert time.monotonic() - start < 10, "a dead master must fail data-plane calls fast"
            start = time.monotonic()
            with pytest.raises((Unavailable, NotFound)):  # after the client's own retries
                client.generate(token_ids=ids, **GREEDY)
            # about one of Mooncake's RPC timeouts (~4 s), not one per block the aborted put frees (MooncakeSpace.free)
            assert time.monotonic() - start < 15
            master.start()  # same ports: every Mooncake client re-registers with the new, empty master
            deadline, got = time.monotonic() + 30, None
            while got is None:
                try:
                    got = client.generate(token_ids=ids, **GREEDY).token_ids
                except QwenpdError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert got == want  # the cached prefix's bytes are gone: a miss and a recompute, never other bytes
            assert client.generate(token_ids=ids, **GREEDY).token_ids == want
            with pytest.raises(NotFound):  # its bytes died with the old master
                store.get_checkpoint(old, "fp")
    finally:
        assert stop_serve_all(s) == 0
