"""Batch invariance of the decode step: a sequence's logits are the same bits whatever batch it runs in, in any
slot, beside sequences of any context length (one or several attention tiles). Crash resume depends on it: the
resumed sequence is replayed through decode steps in another batch than the one that first decoded it, and the
next token must come from identical logits (decode_service/runner.py). Checked on our `tiny` and on transformers'
checkpoints of other shapes (odd head counts, GQA ratios, conv widths), fp32 and bf16."""

from __future__ import annotations

import platform

import pytest
import torch

from qwenpd.engine import DecodeBatch, Engine

CONTEXTS = (5, 17, 600, 60, 9, 100, 1100, 3)  # 600 and 1100 span two and three attention tiles
STEPS = 12


def _decode(engine: Engine, prompts: list[list[int]], order: list[int], feed: list[list[int]]) -> dict[int, torch.Tensor]:
    """Decode prompts[i] for i in `order` together (slots in that order), feeding feed[i]; logits [STEPS, V] per i."""
    states = {i: engine.prefill(prompts[i])[1] for i in order}
    batch = DecodeBatch(engine, max_batch=len(prompts))
    for i in order:
        batch.add(states[i])
    out: dict[int, list[torch.Tensor]] = {i: [] for i in order}
    try:
        for step in range(STEPS):
            rows = [order.index(i) for i in order]
            logits = batch.step([feed[i][step] for i in order])
            for i, row in zip(order, rows):
                out[i].append(logits[row].clone())
    finally:
        for s in list(batch.states):
            batch.remove(s)
        for s in states.values():
            s.release()
    return {i: torch.stack(v) for i, v in out.items()}


def _check(engine: Engine, contexts: tuple[int, ...] = CONTEXTS) -> None:
    g = torch.Generator().manual_seed(0)
    v = engine.config.vocab_size
    prompts = [torch.randint(0, v, (n,), generator=g).tolist() for n in contexts]
    feed = [torch.randint(0, v, (STEPS,), generator=g).tolist() for _ in contexts]
    everyone = _decode(engine, prompts, list(range(len(prompts))), feed)
    reversed_ = _decode(engine, prompts, list(reversed(range(len(prompts)))), feed)
    for i in range(len(prompts)):
        alone = _decode(engine, prompts, [i], feed)[i]
        assert torch.equal(alone, everyone[i]), f"context {contexts[i]}: alone vs in a batch of {len(prompts)}"
        assert torch.equal(reversed_[i], everyone[i]), f"context {contexts[i]}: another slot"
    longest = max(range(len(contexts)), key=lambda i: contexts[i])
    pair = _decode(engine, prompts, [longest, 1], feed)  # the longest beside a short one
    assert torch.equal(pair[1], everyone[1]) and torch.equal(pair[longest], everyone[longest])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_decode_is_batch_invariant(tiny_model_dir, dtype):
    _check(Engine(tiny_model_dir, dtype=dtype))


@pytest.mark.parametrize("variant", ["every2nd", "conv5_tied"])
def test_transformers_checkpoints_decode_batch_invariant(hf_checkpoint, variant):
    _check(Engine(hf_checkpoint(variant), dtype="float32"))


def test_compiled_decode_is_batch_invariant_across_batch_and_width_buckets(tiny_model_dir):
    """Compiled decode: a sequence alone (the smallest batch bucket, one-tile width bucket) and beside a 1100-token one
    (bucket 8, the wide bucket) gets the same bits; inductor's code for a traced attention tile did not."""
    engine = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=64 << 20)
    try:
        engine.compile(engine.default_buckets(64, 8, max_context=2048), max_batch=8, graphs=("decode",))
        assert len(engine.runner.buckets.widths) > 1 and engine.runner.buckets.batches[0] == 2
        _check(engine)
    finally:  # dynamo counts compilations per code object across engines: leave none for the next test's limit
        torch._dynamo.reset()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="inductor's AVX2 code: x86 only")
def test_compiled_decode_is_batch_invariant_at_qwen36_27b_hidden_size(tmp_path):
    """Hidden size 5120 (Qwen3.6-27B's) at 2 threads, inductor generating AVX2 code (8 fp32 lanes, as on a CPU
    without AVX-512): inductor splits a row's RMSNorm over the threads where the rows are too few beside it (a
    lone row always; 2 rows of 5120 at 8 lanes), so a step in the smallest bucket reduced in another order than
    the same row in a bigger one. runner.min_compiled_rows pads the buckets to rows that are never split (3
    here; with 2 rows, or 1, this fails). The tiny checkpoints above are too narrow for any split."""
    from tests.hf_models import save_hf_checkpoint

    path = save_hf_checkpoint(tmp_path / "wide", "text", hidden_size=5120, num_hidden_layers=2,
                              layer_types=["linear_attention", "full_attention"])
    with torch._inductor.config.patch({"cpp.simdlen": 256}):
        engine = Engine(path, dtype="float32", kv_cache_bytes=16 << 20, threads=2)
        try:
            engine.compile(engine.default_buckets(64, 4, max_context=512), max_batch=4, graphs=("decode",))
            assert engine.runner.buckets.batches[0] == 3
            _check(engine, contexts=(5, 17, 300, 60))
        finally:
            torch._dynamo.reset()


def test_tensor_parallel_decode_is_batch_invariant(tiny_model_dir):
    """Two ranks (each its heads and channels; the all-reduce sums two partials per element): still invariant,
    so a resumed --decode-tp stream replays exactly (tests/services/test_tensor_parallel.py kills a rank)."""
    engine = Engine(tiny_model_dir, dtype="float32", tp=2)
    try:
        _check(engine)
    finally:
        engine.close()
