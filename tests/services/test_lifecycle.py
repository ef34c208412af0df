"""Slots and checkpoints are freed on cancel and deadline; serve all and the demo start and stop cleanly; the
CLI's remote generate prints the same JSON line as in-process."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from clients import Client, DeadlineExceeded
from engine.generate import generate
from engine.sampling import SamplingParams
from tests.services.conftest import pid_alive, qwenpd_cmd, segments, start_serve_all, stop_serve_all

LONG = dict(temperature=0, max_tokens=5000, ignore_eos=True)


def _wait_idle(client: Client, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (load := client.load()).active_sequences or load.queued:
        assert time.monotonic() < deadline, f"decode still busy: {load}"
        time.sleep(0.01)


def _store_counts(store) -> tuple[int, int]:
    s = store.stats()
    return s.leases, s.entries


def test_cancel_mid_stream_frees_the_slot_and_the_checkpoint(client, store):
    _wait_idle(client)
    before = _store_counts(store)
    stream = client.stream("cancel me", **LONG)
    got = [next(stream) for _ in range(5)]
    assert all(c.token_ids for c in got)
    assert client.load().active_sequences == 1
    stream.close()  # cancels the decode call
    _wait_idle(client, timeout=2.0)
    assert _store_counts(store) == before  # lease released, single-use checkpoint deleted
    assert client.generate("after cancel", max_tokens=4, temperature=0).token_ids


def test_deadline_frees_the_slot(client, store):
    _wait_idle(client)
    before = _store_counts(store)
    with pytest.raises(DeadlineExceeded):
        client.generate("too slow", timeout=0.5, **LONG)
    _wait_idle(client, timeout=2.0)
    assert _store_counts(store) == before


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
    assert (tmp_path / "qwenpd" / "tiny-seed0" / "config.json").is_file()
    assert set(segments("demo*")) <= before
