"""Prefill and decode each at their own tensor-parallel degree: every pair gives the tokens of the unsharded
in-process engine, with and without a prefix-cache hit, and a lost decode (leader or one of its ranks) is
resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from qwenpd.clients import Client
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.services.conftest import pid_alive, segments, start_serve_all, stop_serve_all

# the tiny preset's MTP head (random: its drafts are rejected) under the adaptive policy: a stream's first steps
# draft (while the policy measures), the rest step plainly with the heads reading late, on every rank
SPECULATIVE = ("--num-speculative-tokens", "3")
# (prefill degree, decode degree, speculative): (1, 1) is every other service test; with speculation the head runs
# on the leaders (prefill: over the prompt, decode: drafting) while every rank verifies
PAIRS = [(1, 2, True), (2, 1, True), (2, 2, False)]


def _ranks(pid: int) -> list[int]:
    """The child processes of `pid` (a service's tensor-parallel ranks, started by whichever thread loaded the
    engine)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in children.read_text().split()]
        except FileNotFoundError:
            pass
    return sorted(out)


def _prompt(n: int, seed: int) -> list[int]:
    import torch

    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


REQUESTS = [  # (prompt ids, sampling): greedy and seeded; 300 tokens cross a 256-token prefix-cache block
    (_prompt(300, 1), dict(temperature=0, max_tokens=12, ignore_eos=True)),
    (_prompt(40, 2), dict(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def expected(engine):
    return [generate(engine, ids, SamplingParams(**kw)).token_ids for ids, kw in REQUESTS]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"prefill-tp{p[0]}-decode-tp{p[1]}" + "-mtp" * p[2])
def test_every_pair_gives_the_same_tokens(pair, tiny_model_dir, tmp_path, expected):
    from tests.services.test_exact_resume import _metric
    from tests.services.test_supervisor import _free_ports

    p, d, speculative = pair
    metrics = _free_ports(5)
    s = start_serve_all(tiny_model_dir, tmp_path, f"tp{p}{d}{os.getpid()}", "--prefill-tp", str(p), "--decode-tp",
                        str(d), "--no-gateway", "--metrics-port", str(metrics), *(SPECULATIVE if speculative else ()))
    try:
        assert len(_ranks(s.children["prefill"])) == p - 1 and len(_ranks(s.children["decode"])) == d - 1
        ranks = _ranks(s.children["prefill"]) + _ranks(s.children["decode"])
        with Client(prefill=s.prefill, decode=s.decode, timeout=120) as c:
            for (ids, kw), want in zip(REQUESTS, expected):
                first = c.generate(token_ids=ids, **kw)
                again = c.generate(token_ids=ids, **kw)  # its first 256 tokens now come from the prefix cache
                assert first.token_ids == want and again.token_ids == want
            hit = c.generate(token_ids=REQUESTS[0][0], **REQUESTS[0][1])
            assert hit.cached_tokens >= 256
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics + 2}/metrics", timeout=10).read().decode()
        assert (_metric(scrape, "qwenpd_decode_draft_tokens_total") > 0) == speculative
    finally:
        code = stop_serve_all(s)
    assert code == 0
    assert not any(pid_alive(pid) for pid in [*s.children.values(), *ranks]), "a process outlived serve all"
    assert segments(s.store_id) == []


def _stream(gateway: str, request, on_chunk=None) -> list:
    with grpc.insecure_channel(gateway) as ch:
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        got = []
        for i, chunk in enumerate(stub.Generate(request, timeout=120)):
            got.append(chunk)
            if on_chunk is not None:
                on_chunk(i)
        return got


def test_lost_decode_rank_then_leader_are_resumed_exactly(tiny_model_dir, tmp_path):
    """--decode-tp 2 under kill -9, mid-stream, first of a decode rank, then (after serve all restarted the service)
    of the decode leader itself: a lost rank takes the service down (its calls fail UNAVAILABLE, health
    NOT_SERVING, exit 1), serve all restarts it with fresh ranks, and both streams resume exactly."""
    store_id = f"tpk{os.getpid()}"
    # the gateway holds a broken stream until the restarted service answers: compiled, that is its warm-up
    s = start_serve_all(tiny_model_dir, tmp_path, store_id, "--decode-tp", "2", "--resume-wait", "120")
    try:
        request = generate_pb2.GenerateRequest(text="A tensor-parallel decode", sampling=common_pb2.SamplingParams(
            temperature=0.9, seed=4, max_tokens=300, ignore_eos=True))
        ref = [t for c in _stream(s.gateway, request) for t in c.token_ids]
        for victim in ("rank", "leader"):
            leader = s.children["decode"]
            (rank,) = _ranks(leader)

            def kill(i: int) -> None:
                if i == 3:
                    os.kill(leader if victim == "leader" else rank, signal.SIGKILL)

            got = _stream(s.gateway, request, kill)
            assert [t for c in got for t in c.token_ids] == ref, victim
            assert got[-1].timings.resumes >= 1, victim
            deadline = time.monotonic() + 30
            while pid_alive(leader) or pid_alive(rank):
                assert time.monotonic() < deadline, f"{victim}: the old decode group is still running"
                time.sleep(0.1)
            deadline = time.monotonic() + 60
            while True:  # serve all restarts the decode service and rewrites its ready file
                s.children = json.loads((tmp_path / f"{store_id}.json").read_text())["children"]
                if s.children["decode"] != leader and len(_ranks(s.children["decode"])) == 1:
                    break
                assert time.monotonic() < deadline, f"{victim}: decode was not restarted with its rank"
                time.sleep(0.2)
    finally:
        code = stop_serve_all(s)
    assert code == 0
