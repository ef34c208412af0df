"""Slots and checkpoints are freed on cancel and deadline; serve all and the demo start and stop cleanly; the
CLI's remote generate prints the same JSON line as in-process."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from qwenpd.clients import Client, DeadlineExceeded
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from tests.services.conftest import (model_service_flags, pid_alive, quiet, qwenpd_cmd, segments, start_serve_all,
                                     stop_serve_all, wait_ready_file)

LONG = dict(temperature=0, max_tokens=5000, ignore_eos=True)


def _wait_idle(client: Client, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (load := client.load()).active_sequences or load.queued:
        assert time.monotonic() < deadline, f"decode still busy: {load}"
        time.sleep(0.01)


def _store_counts(store) -> tuple[int, int]:
    s = store.stats()
    return s.leases, s.entries


def _settled(store, before: tuple[int, int], timeout: float = 2.0) -> tuple[int, int]:
    """The store's counts once they are back to `before` (the decode service ends a stream's lease on its resume
    point and deletes it a moment after the stream ends), or as they are at the timeout."""
    deadline = time.monotonic() + timeout
    while (now := _store_counts(store)) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


def test_cancel_mid_stream_frees_the_slot_and_the_checkpoint(client, store):
    _wait_idle(client)
    before = quiet(lambda: _store_counts(store))
    stream = client.stream("cancel me", **LONG)
    got = [next(stream) for _ in range(5)]
    assert all(c.token_ids for c in got)
    assert client.load().active_sequences == 1
    stream.close()  # cancels the decode call
    _wait_idle(client, timeout=2.0)
    assert _settled(store, before) == before  # leases released, the stream's checkpoint deleted
    assert client.generate("after cancel", max_tokens=4, temperature=0).token_ids


def test_deadline_frees_the_slot(client, store):
    _wait_idle(client)
    before = quiet(lambda: _store_counts(store))
    with pytest.raises(DeadlineExceeded):
        client.generate("too slow", timeout=0.5, **LONG)
    _wait_idle(client, timeout=2.0)
    assert _settled(store, before) == before


def test_several_addresses_route_around_a_dead_one(services):
    dead = "127.0.0.1:1"
    with Client(prefill=[dead, services.prefill], decode=[dead, services.decode], timeout=30) as c:
        for _ in range(3):
            assert len(c.generate("routing", max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3


def test_generate_remote_json_matches_in_process(services, engine):
    r = subprocess.run(qwenpd_cmd("generate", "--prefill", services.prefill, "--decode", services.decode,
                                  "--prompt", "Hello, world!", "--max-tokens", "12", "--temperature", "0",
                                  "--ignore-eos", "--json"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)
    ref = generate(engine, engine.tokenizer.encode("Hello, world!"),
                   SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert line["token_ids"] == ref.token_ids and line["text"] == ref.text
    assert {"prompt_tokens", "prefill_s", "decode_s", "ttft_s", "tpot_s", "cached_tokens"} <= set(line)


def test_serve_all_stops_cleanly_and_leaves_no_segments(tiny_model_dir, tmp_path):
    s = start_serve_all(tiny_model_dir, tmp_path, f"stop{os.getpid()}", "--grace", "0.5")
    with Client(prefill=s.prefill, decode=s.decode, timeout=30) as c:
        stream = c.stream("left running", **LONG)
        next(stream)  # a sequence is mid-flight when the services stop
        assert stop_serve_all(s) == 0
        stream.close()
    assert not any(pid_alive(p) for p in s.children.values())
    assert segments(s.store_id) == []


def test_demo_runs_end_to_end(tmp_path):
    before = set(segments("demo*"))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # the demo makes the tiny model there
    r = subprocess.run(qwenpd_cmd("demo", "--max-tokens", "8", "--threads", "1"), capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("TTFT") == 3 and "done" in r.stdout
    assert "tool call 0: get_weather({" in r.stdout and "FINISH_REASON_TOOL_CALLS" in r.stdout  # a forced call
    tpots = [float(line.split("TPOT ")[1].split(" ms")[0]) for line in r.stdout.splitlines() if "TPOT" in line]
    assert len(tpots) == 3 and all(t > 0.3 for t in tpots), tpots  # per token, never ~0 from coalesced chunks
    assert (tmp_path / "qwenpd" / "tiny-seed0" / "config.json").is_file()
    assert set(segments("demo*")) <= before


@pytest.fixture(scope="module")
def small_queue_prefill(services, tiny_model_dir, tmp_path_factory):
    """A second prefill service on the same model and store: no waiting room, short chunks."""
    ready = tmp_path_factory.mktemp("pq") / "prefill.json"
    proc = subprocess.Popen(qwenpd_cmd("serve", "prefill", "--model", str(tiny_model_dir), "--cache", services.cache,
                                       "--max-queue", "0", "--chunk-size", "64", "--threads", "1",
                                       "--ready-file", str(ready), "--log-level", "WARNING",
                                       *model_service_flags()))
    try:
        yield wait_ready_file(ready, proc)["address"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


LONG_PROMPT = [5 + (7 * i) % 500 for i in range(8000)]


def _prefill(address: str, ids: list[int], timeout: float):
    import grpc

    from qwenpd.clients.errors import from_rpc_error
    from qwenpd.protos.qwenpd.v1 import prefill_pb2, prefill_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            return prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(
                prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=ids)), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def test_prefill_deadline_abandons_the_job_between_chunks(small_queue_prefill, store):
    before = store.stats().allocations + store.stats().entries
    with pytest.raises(DeadlineExceeded):
        _prefill(small_queue_prefill, LONG_PROMPT, timeout=0.1)
    time.sleep(1.5)  # the whole prompt takes longer than this; an unabandoned job would have written a checkpoint
    after = store.stats()
    assert after.allocations + after.entries == before
    response = _prefill(small_queue_prefill, [1, 2, 3], timeout=30)  # and the worker is free again
    store.delete(response.checkpoint_id)


def test_prefill_queue_full_is_resource_exhausted(small_queue_prefill, store):
    from concurrent.futures import ThreadPoolExecutor

    from qwenpd.clients import ResourceExhausted

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_prefill, small_queue_prefill, LONG_PROMPT, 60) for _ in range(3)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except ResourceExhausted as exc:
                outcomes.append(exc)
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    assert refused and len(refused) < 3
    assert refused[0].retry_after_s is not None
    for o in outcomes:
        if not isinstance(o, ResourceExhausted):
            store.delete(o.checkpoint_id)
