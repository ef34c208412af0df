"""Speculative decoding on compiled graphs: the verify pass runs the decode step's compiled regions (the
DeltaNet recurrence position by position, every row-wise part over all the pass's rows at once), so its logits are
the bits of plain compiled decode steps, alone and batched, whatever the drafts; nothing compiles while serving."""

from __future__ import annotations

import pytest
import torch

from qwenpd.engine import DecodeBatch, Engine
from qwenpd.engine.generate import generate, generate_speculative
from qwenpd.engine.runner import Buckets
from qwenpd.engine.sampling import SamplingParams
from qwenpd.engine.speculative import Drafter
from tests.engine.test_compiled import no_recompiles  # noqa: F401 - the fixture: fail on any compile while serving
from tests.hf_models import with_mtp_head

BUCKETS = Buckets(chunks=(16, 64), batches=(1, 4), widths=(8, 32))
VERIFY = (3, 4)  # 3 sequences x 4 positions: batch buckets (2, 4, 12) after Buckets.covering (and at_least)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def compiled(hf_checkpoint, tmp_path_factory):
    """A compiled engine (decode graphs, regions) on the 'every2nd' checkpoint with an added MTP head."""
    path = with_mtp_head(hf_checkpoint("every2nd"), tmp_path_factory.mktemp("mtp") / "ckpt")
    engine = Engine(path, dtype="float32", kv_cache_bytes=1 << 20, page_size=16, speculative=True)
    engine.compile(BUCKETS, max_batch=4, graphs=("decode",), verify=VERIFY)
    yield engine, engine.draft_head
    torch._dynamo.reset()  # dynamo counts compilations per code object across engines


def test_verify_rows_are_compiled_at_warm_up(compiled):
    engine, _ = compiled
    assert engine.runner.buckets.batches == (2, 4, 12) and engine.runner.layers is not None
    # two-part passes: 1 or 2 sequences (rows 2), 3 (rows 4), 2-4 tokens each
    assert engine.runner.two_part == ((2, 2), (2, 3), (2, 4), (4, 2), (4, 3), (4, 4))


def test_whole_graphs_refuse_speculation(hf_checkpoint):
    engine = Engine(hf_checkpoint("every2nd"), dtype="float32", kv_cache_bytes=1 << 20, page_size=16)
    with pytest.raises(ValueError, match="compiled by region"):
        engine.compile(BUCKETS, max_batch=4, graphs=("decode",), regional=False, verify=VERIFY)


def _mostly_right(monkeypatch, sequence: list[int]) -> None:
    """Drafts that are the right tokens but for one in three steps' first or second: accepts and rejects."""
    def draft(self, hidden, next_tokens, start, k):
        first = start + len(next_tokens) + 1
        out = sequence[first:first + k] + [1] * k
        out = out[:k]
        wrong = (first * 2654435761 >> 9) % 3
        if wrong and wrong <= k:
            out[wrong - 1] = out[wrong - 1] % 299 + 1
        return out
    monkeypatch.setattr(Drafter, "draft", draft)


@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                    SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True)],
                         ids=["greedy", "sampled"])
def test_compiled_speculation_is_plain_compiled_decoding(compiled, monkeypatch, no_recompiles, params, rollback):
    engine, head = compiled
    prompt = _ids(50, engine.config.vocab_size, 3)
    ref = generate(engine, prompt, params)
    _mostly_right(monkeypatch, prompt + ref.token_ids)
    got = generate_speculative(engine, head, prompt, params, 3, rollback=rollback)
    assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs)
    assert 0 < got.accepted_tokens < got.draft_tokens


@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
@pytest.mark.parametrize("uniform", [False, True], ids=["ragged", "uniform"])
def test_batched_verify_rows_are_the_bits_of_plain_compiled_steps(compiled, no_recompiles, monkeypatch, rollback,
                                                                   uniform):
    """Three sequences (contexts in both width buckets) in one batch, each feeding 1-4 positions a pass (ragged:
    some steps all of them, others a subset: gathered slots, the recurrence a compiled step per position;
    uniform: all the same number, the pass in two parts: the compiled verify inputs, then the step kernel over
    every position), drafts right and wrong: every verified position's logits equal the plain compiled step's at
    that position, bit for bit, and the accepted tokens continue exactly."""
    engine, _ = compiled
    layers, two_part = engine.runner.layers, []
    region = layers.linear_verify_inputs
    monkeypatch.setattr(layers, "linear_verify_inputs", lambda *a: two_part.append(a[1].shape[0]) or region(*a))
    vocab = engine.config.vocab_size
    prompts = [_ids(n, vocab, seed) for n, seed in ((40, 1), (17, 2), (150, 3))]
    steps = 14

    def start() -> tuple[DecodeBatch, list[list[int]]]:
        batch, tokens = DecodeBatch(engine, max_batch=4), []
        for p in prompts:
            logits, state = engine.prefill(p)
            batch.add(state)
            tokens.append([int(logits.argmax())])
        return batch, tokens

    batch, ref = start()
    ref_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(steps + 4):
        logits = batch.step([t[-1] for t in ref])
        for b, row in enumerate(logits):
            ref_logits[b].append(row.clone())
            ref[b].append(int(row.argmax()))
    batch, got = start()
    turn = 0
    while min(len(g) for g in got) < steps:
        fed = []
        for b, g in enumerate(got):
            n = len(g)
            k = turn % 4 if uniform else (turn + b) % 4  # 0-3 drafts: every pattern of who steps at each position
            drafts = ref[b][n:n + k]
            if (turn * 7 + b) % 3 == 0 and drafts:
                drafts[-1] = drafts[-1] % (vocab - 1) + 1  # a wrong last draft
            fed.append([g[-1], *drafts])
        done = batch.verify(fed, rollback)
        consumed = []
        for b, (g, f) in enumerate(zip(got, fed)):
            n, rows = len(g), done.logits[done.rows(b)]
            kept = 0
            for i in range(len(f)):
                assert torch.equal(rows[i], ref_logits[b][n - 1 + i]), f"sequence {b} position {n + i}"
                g.append(int(rows[i].argmax()))
                kept += 1
                if i == len(f) - 1 or g[-1] != f[i + 1]:
                    break
            consumed.append(kept)
        batch.accept(consumed)
        turn += 1
    assert all(g == r[:len(g)] for g, r in zip(got, ref))
    assert set(two_part) == ({4 * 2, 4 * 3, 4 * 4} if uniform else set())  # rows x tokens of the two-part passes


def test_services_refuse_whole_graphs_with_speculation(tiny_model_dir):
    from qwenpd.engine.engine_config import EngineConfig
    from qwenpd.model_service import check_speculative

    with pytest.raises(ValueError, match="--whole-graphs"):
        check_speculative(EngineConfig(model_dir=str(tiny_model_dir), compile=True, whole_graphs=True), 3)
    check_speculative(EngineConfig(model_dir=str(tiny_model_dir), compile=True), 3)  # regional: served
