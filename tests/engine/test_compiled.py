"""The compiled engine (torch.compile, static buckets, paged KV) against transformers and the eager engine on the
same checkpoints; padding changes no state; zero recompiles after warm-up (torch._dynamo error_on_recompile)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from qwenpd.engine import DecodeBatch, Engine
from qwenpd.engine.runner import Buckets, min_compiled_rows
from tests.hf_models import load_hf

ATOL = 1e-4
BUCKETS = Buckets(chunks=(16, 64), batches=(1, 4), widths=(8, 32))
PAGE = 16


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engines(hf_checkpoint):
    """(transformers, eager engine, compiled engine) on the 'every2nd' checkpoint (attention every 2nd layer)."""
    path = hf_checkpoint("every2nd")
    compiled = Engine(path, dtype="float32", kv_cache_bytes=(1 << 20), page_size=PAGE)
    compiled.warmup_s = compiled.compile(BUCKETS, max_batch=4)
    return load_hf(path, "every2nd"), Engine(path, dtype="float32", page_size=PAGE), compiled


@pytest.fixture
def no_recompiles():
    """Fail on any recompilation inside the test; and check that no graph was added at all."""
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    assert counters["stats"]["unique_graphs"] == before, "a graph was compiled after warm-up"


def test_warm_up_compiled_every_bucket(engines):
    _, _, compiled = engines
    assert compiled.warmup_s > 0 and compiled.runner.buckets == BUCKETS.at_least(min_compiled_rows(compiled.config))
    assert counters["stats"]["unique_graphs"] >= BUCKETS.count()


@pytest.mark.parametrize("t,chunk", [(1, 16), (13, 16), (64, 64), (150, 64)], ids=lambda v: str(v))
def test_compiled_prefill_matches_transformers(engines, no_recompiles, t, chunk):
    hf, eager, compiled = engines
    ids = _ids(t, eager.config.vocab_size, seed=t)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].float()
    logits, state = compiled.prefill(ids, chunk_size=chunk)
    assert (logits - ref).abs().max().item() <= ATOL
    _, eager_state = eager.prefill(ids, chunk_size=chunk)
    for name, a in state.to_tensors().items():  # padding of the last chunk changed no state
        b = eager_state.to_tensors()[name]
        assert (a - b).abs().max().item() <= ATOL * max(1.0, b.abs().max().item()), name


def test_compiled_greedy_matches_transformers_generate(engines, no_recompiles):
    hf, eager, compiled = engines
    prompt = _ids(23, eager.config.vocab_size, seed=11)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    logits, state = compiled.prefill(prompt, chunk_size=16)
    batch = DecodeBatch(compiled, 1)
    batch.add(state)
    got = [int(logits.argmax())]
    while len(got) < 40:
        got.append(int(batch.step([got[-1]])[0].argmax()))
    assert got == expected


def test_compiled_batch_with_padding_rows_join_and_leave(engines, no_recompiles):
    """Three sequences in a batch bucket of 4 (one padding row), one leaves, another joins: every step equals the
    eager engine's solo decode of that sequence."""
    _, eager, compiled = engines
    v = eager.config.vocab_size
    prompts = {n: _ids(length, v, seed=length) for n, length in (("a", 9), ("b", 130), ("c", 30), ("d", 5))}

    def solo(name):
        logits, st = eager.prefill(prompts[name])
        b = DecodeBatch(eager, 1)
        b.add(st)
        toks, outs = [int(logits.argmax())], []
        for _ in range(6):
            outs.append(b.step([toks[-1]])[0])
            toks.append(int(outs[-1].argmax()))
        return toks, outs

    ref = {n: solo(n) for n in prompts}
    batch, states, fed = DecodeBatch(compiled, 4), {}, {}
    for n in ("a", "b", "c"):
        _, states[n] = compiled.prefill(prompts[n], chunk_size=64)
        batch.add(states[n])
        fed[n] = 0
    for step in range(6):
        if step == 2:
            batch.remove(states.pop("a"))
            _, states["d"] = compiled.prefill(prompts["d"], chunk_size=64)
            batch.add(states["d"])
            fed["d"] = 0
        names = [next(n for n, s in states.items() if s is st) for st in batch.states]
        logits = batch.step([ref[n][0][fed[n]] for n in names])
        for row, n in enumerate(names):
            assert (logits[row] - ref[n][1][fed[n]]).abs().max().item() <= ATOL, (n, step)
            fed[n] += 1


def test_compile_needs_a_fixed_kv_cache(hf_checkpoint):
    eng = Engine(hf_checkpoint("every2nd"), dtype="float32")
    with pytest.raises(ValueError, match="fixed-size KV cache"):
        eng.compile(BUCKETS, max_batch=4)


def test_chunks_are_capped_at_the_largest_bucket_and_contexts_past_the_widths_refused(engines, no_recompiles):
    _, eager, compiled = engines
    ids = _ids(100, eager.config.vocab_size, 1)
    logits, _ = compiled.prefill(ids, chunk_size=100)  # run as chunks of 64 + 36
    assert (logits - eager.prefill(ids, chunk_size=100)[0]).abs().max().item() <= ATOL
    with pytest.raises(ValueError, match="exceeds the largest compiled bucket"):
        compiled.prefill(_ids(32 * PAGE + 1, eager.config.vocab_size, 2), chunk_size=64)
    assert Buckets.default(512, 32, 32768, 64) == Buckets((64, 512), (1, 4, 16, 32), (8, 32, 128, 512))
    assert Buckets.default(512, 1, 11, 64) == Buckets((11,), (1,), (1,))  # generate: the prompt + max_tokens


def test_a_service_compiles_only_the_graphs_it_runs(engines, hf_checkpoint):
    """Decode compiles only decode graphs; its prefill (the start-up check) runs eagerly on the padded shapes.
    (Whole graphs here, regions in the other tests.)"""
    _, eager, _ = engines
    buckets = Buckets(chunks=(32,), batches=(2,), widths=(16,))  # shapes no other test compiles
    decode_only = Engine(hf_checkpoint("every2nd"), dtype="float32", kv_cache_bytes=(1 << 20), page_size=PAGE)
    before = counters["stats"]["unique_graphs"]
    decode_only.compile(buckets, max_batch=2, graphs=("decode",), regional=False)  # whole graphs
    assert counters["stats"]["unique_graphs"] - before == buckets.count(("decode",)) == 1
    assert decode_only.runner.prefill_fn == decode_only.model.prefill_graph
    ids = _ids(20, eager.config.vocab_size, 3)
    logits, state = decode_only.prefill(ids, chunk_size=32)
    assert (logits - eager.prefill(ids, chunk_size=32)[0]).abs().max().item() <= ATOL
    assert counters["stats"]["unique_graphs"] - before == 1


def test_more_buckets_than_dynamos_default_limit_per_function(engines):
    """A decode service's default buckets (4 batch sizes x 3+ widths) are more than dynamo's 8 graphs per function,
    which would fail the warm-up under fullgraph=True: the runner raises the limit to its bucket count."""
    from qwenpd.engine.runner import GraphRunner

    _, _, compiled = engines
    many = Buckets(chunks=(16,), batches=(1, 4, 16, 32), widths=(8, 32, 128))
    GraphRunner(compiled.model, many, graphs=("decode",))
    assert torch._dynamo.config.recompile_limit >= many.count(("decode",)) == 12


def test_regions_are_compiled_once_per_layer_kind_and_shape(engines, hf_checkpoint):
    """Regional compile: a region serves every layer of its kind (not one graph per layer), and a DeltaNet region
    does not depend on the block-table width; the steps equal the eager engine's."""
    _, eager, _ = engines
    buckets = Buckets(chunks=(48,), batches=(3,), widths=(16, 24))  # shapes no other test compiles
    eng = Engine(hf_checkpoint("every2nd"), dtype="float32", kv_cache_bytes=(1 << 20), page_size=PAGE)
    assert len(eng.config.linear_layers) >= 2 and len(eng.config.attention_layers) >= 2
    before = counters["stats"]["unique_graphs"]
    eng.compile(buckets, max_batch=3, regional=True)
    # prefill: DeltaNet 1 + attention 2 widths + head; decode: DeltaNet 3 (before, in and after its recurrence) +
    # attention 2 + head 3 rows
    assert counters["stats"]["unique_graphs"] - before <= 10
    before = counters["stats"]["unique_graphs"]
    ids = _ids(40, eager.config.vocab_size, 4)
    logits, state = eng.prefill(ids, chunk_size=48)
    ref, ref_state = eager.prefill(ids, chunk_size=48)
    assert (logits - ref).abs().max().item() <= ATOL
    got = eng.decode([state], [7])
    assert (got - eager.decode([ref_state], [7])).abs().max().item() <= ATOL
    assert counters["stats"]["unique_graphs"] == before  # nothing compiled after the warm-up
