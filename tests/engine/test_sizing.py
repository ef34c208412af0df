"""bench/sizing.py: its byte counts agree with the engine's own shapes and the sharding plan."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from qwenpd.engine.config import preset
from qwenpd.engine.tp.plan import ShardPlan

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sizing.py"


@pytest.fixture(scope="module")
def sizing():
    spec = importlib.util.spec_from_file_location("sizing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["qwen3.6-27b", "qwen3.5-2b", "small"])
def test_state_bytes_match_the_config_and_split_exactly(sizing, name):
    """Total state = ModelConfig.state_bytes; what the ranks write into a shared checkpoint adds up to it at every
    degree (replicas write once), and what one rank holds is never less than what it writes."""
    c = preset(name)
    kinds = ("k", "v", "conv", "recurrent")
    for tokens in (1, 4096):
        total = sizing.state_bytes(c, tokens, None, kinds)
        assert total == c.state_bytes(tokens)
        for tp in (1, 2, 4, 8):
            plans = [ShardPlan(c, tp, r) for r in range(tp)]
            written = [sizing.state_bytes(c, tokens, p, kinds, written=True) for p in plans]
            assert sum(written) == total, (name, tp)
            assert all(sizing.state_bytes(c, tokens, p, kinds) >= w for p, w in zip(plans, written))


def test_weight_bytes_split(sizing):
    c = preset("qwen3.6-27b")
    assert sizing.weight_bytes(c, None) == 2 * c.num_parameters()
    replicated = sizing.weight_bytes(c, ShardPlan(c, 4, 0), replicated_only=True)
    sharded = sizing.weight_bytes(c, ShardPlan(c, 4, 0)) - replicated
    assert 4 * sharded + replicated == sizing.weight_bytes(c, None)
    assert sizing.kv_per_token(c, None) == 16 * 2 * 4 * 256 * 2  # 16 attention layers, K and V, 4 heads of 256
    assert sizing.kv_per_token(c, ShardPlan(c, 8, 0)) == sizing.kv_per_token(c, ShardPlan(c, 4, 0))  # replicas


def test_script_runs_and_names_what_does_not_fit():
    r = subprocess.run([sys.executable, str(SCRIPT), "--no-measure"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TP 16 does not divide num_attention_heads=24" in r.stdout
    assert "trn2.3xlarge (4 logical cores), 4K-token prompts, 512 tokens out: does not fit" in r.stdout
    assert r.stdout.count("| best |") >= 6


@pytest.mark.parametrize("mode", ["replay", "snapshot"])
@pytest.mark.parametrize("k", [1, 3])
def test_rollback_bytes_are_what_a_verify_pass_keeps(sizing, tiny_model_dir, mode, k):
    """The rollback table's formula against a real verify pass of one bf16 sequence feeding k drafts (the two-part
    pass, which runs with the delta rule's C++ step kernel)."""
    from qwenpd.kernels.gated_delta_rule import cpu

    if not cpu.load():
        pytest.skip(f"no delta-rule step kernel here ({cpu.why_not}): the verify pass keeps whole-step inputs")
    from qwenpd.engine import DecodeBatch, Engine
    from qwenpd.engine.speculative import rollback_bytes

    engine = Engine(tiny_model_dir, dtype="bfloat16")
    _, state = engine.prefill([5 + i % 50 for i in range(30)])
    batch = DecodeBatch(engine, 1)
    batch.add(state)
    done = batch.verify([[7] * (k + 1)], mode)
    assert rollback_bytes(done) == sizing.rollback_bytes(engine.config, k, mode)
    batch.accept([1])
