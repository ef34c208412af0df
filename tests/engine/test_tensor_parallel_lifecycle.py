"""Tensor parallelism's process side: the CLI, a rank that dies, ranks dying with rank 0, and slow checks (real
shapes, compiled). Separate from test_tensor_parallel.py: one process leads one group at a time, and that
module keeps its sharded engines for the whole module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from qwenpd.engine import DecodeBatch, Engine
from qwenpd.engine.tp.group import RankLost
from qwenpd.engine.tp.plan import ShardingError


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_degree_must_divide(tiny_model_dir):
    with pytest.raises(ShardingError, match="num_attention_heads"):
        Engine(tiny_model_dir, tp=3)


def test_cli_generate_tp_equals_tp1(tiny_model_dir):
    def run(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "qwenpd.cli", "generate", "--model", str(tiny_model_dir),
                              "--prompt", "Hello world", "--max-tokens", "12", "--json", *extra],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    one = run("--temperature", "0", "--threads", "1")
    two = run("--temperature", "0", "--tp", "2", "--threads", "1")
    seeded = [run("--tp", tp, "--temperature", "0.9", "--seed", "7", "--threads", "1") for tp in ("1", "2")]
    assert two["token_ids"] == one["token_ids"] and len(one["token_ids"]) >= 8
    assert seeded[0]["token_ids"] == seeded[1]["token_ids"]
    bad = subprocess.run([sys.executable, "-m", "qwenpd.cli", "generate", "--model", str(tiny_model_dir),
                          "--prompt-ids", "1,2", "--tp", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "num_attention_heads" in bad.stderr


def test_lost_rank_fails_calls_fast(tiny_model_dir):
    """A rank that dies: the next call raises RankLost (UNAVAILABLE) instead of waiting on a collective."""
    eng = Engine(tiny_model_dir, tp=2, threads=1)
    lost = []
    eng.group.on_lost = lost.append
    _, state = eng.prefill([1, 2, 3])
    follower = eng.group.followers[0]
    follower.kill()
    follower.wait()
    deadline = time.monotonic() + 10
    while eng.group.broken is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(RankLost) as err:
        eng.prefill([4, 5], state)
    assert time.monotonic() - started < 5
    assert err.value.status == "UNAVAILABLE" and "rank 1" in str(err.value)
    assert lost and "rank 1" in lost[0]
    eng.close()


def test_followers_die_with_the_leader(tiny_model_dir, tmp_path):
    """kill -9 of the leader leaves no rank behind (PR_SET_PDEATHSIG)."""
    script = tmp_path / "leader.py"
    script.write_text(
        "import sys, time\nfrom qwenpd.engine import Engine\n"
        f"e = Engine({str(tiny_model_dir)!r}, tp=2, threads=1)\n"
        "print(' '.join(str(p.pid) for p in e.group.followers), flush=True)\ntime.sleep(600)\n")
    leader = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in leader.stdout.readline().split()]
    assert pids
    leader.kill()
    leader.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


SLOW = pytest.mark.skipif(not os.environ.get("QWENPD_SLOW_TESTS"),
                          reason="minutes on a 2-core machine: set QWENPD_SLOW_TESTS=1")


@SLOW
def test_compiled_tp_equals_eager_tp1(tiny_model_dir):
    """--compile with --tp 2: the collectives trace into the static graphs (functional collectives) and the
    tokens are those of the eager unsharded engine, with speculation too."""
    def run(*extra: str) -> list[int]:
        out = subprocess.run([sys.executable, "-m", "qwenpd.cli", "generate", "--model", str(tiny_model_dir),
                              "--prompt-ids", "1,2,3,4,5", "--max-tokens", "6", "--temperature", "0", "--json",
                              "--threads", "1", *extra], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["token_ids"]

    compiled = run("--compile", "--kv-cache-bytes", "4MiB", "--tp", "2")
    assert compiled == run()
    # speculation on the compiled ranks: every rank's verify pass runs its compiled decode regions
    assert run("--compile", "--kv-cache-bytes", "4MiB", "--tp", "2", "--num-speculative-tokens", "2") == compiled


@SLOW
def test_qwen36_27b_shapes_tp4_equals_tp1(tmp_path):
    """The real Qwen3.6-27B shapes (one 3 x DeltaNet + 1 x attention group, bf16): TP 4 (KV heads one per rank,
    DeltaNet heads 4 + 12 per rank, vocabulary quarters) gives the greedy tokens of TP 1, and the same state in the
    canonical layout."""
    from qwenpd.engine.init_model import init_model

    path = init_model(tmp_path / "q27", "qwen3.6-27b", num_layers=4)
    prompt, steps = _ids(12, 248320, seed=7), 6

    def run(tp: int):
        eng = Engine(path, tp=tp)
        try:
            logits, state = eng.prefill(prompt, chunk_size=8)
            batch = DecodeBatch(eng, 1)
            batch.add(state)
            tokens, first = [int(logits.argmax())], logits.clone()
            while len(tokens) < steps:
                tokens.append(int(batch.step([tokens[-1]])[0].argmax()))
            batch.remove(state)
            return tokens, first, {n: t.float() for n, t in state.to_tensors().items()}
        finally:
            eng.close()

    tokens1, logits1, state1 = run(1)
    tokens4, logits4, state4 = run(4)
    assert tokens4 == tokens1
    # bf16: sharded sums round in another order; bound the difference relative to the logits' spread
    assert (logits4 - logits1).abs().max().item() < 0.02 * logits1.std().item() * 10
    for name, t in state1.items():
        assert (state4[name] - t).abs().max().item() <= 0.02 * t.abs().max().item() + 1e-3, name
