"""Speculative decoding with the MTP head (engine/speculative.py): the tokens and log-probabilities of plain
decoding, greedy and seeded sampling, whatever the drafts, with either rollback."""

from __future__ import annotations

import pytest
import torch

from qwenpd.engine import Engine
from qwenpd.engine.generate import generate, generate_speculative
from qwenpd.engine.mtp import MTPHead
from qwenpd.engine.sampling import SamplingParams
from qwenpd.engine.speculative import Drafter
from qwenpd.engine.weights import load_mtp_weights
from tests.hf_models import with_mtp_head

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, seed=7, max_tokens=48, ignore_eos=True)


@pytest.fixture
def engine(spec_engine):
    """This module's engine on the tiny model: with the MTP head's KV layers in its paged cache."""
    return spec_engine


def _head(engine: Engine, model_dir) -> MTPHead:
    return MTPHead(engine.config, load_mtp_weights(model_dir, engine.config, engine.dtype), engine.model)


def _oracle_drafts(monkeypatch, sequence: list[int]) -> None:
    """Drafts that are the right tokens except where (position % 3) says otherwise: every accept/reject pattern
    (all drafts right, the first wrong, one in the middle wrong) occurs along a sequence."""
    def draft(self, hidden, next_tokens, start, k):
        first = start + len(next_tokens) + 1  # the absolute index of the token the first draft stands for
        out = sequence[first:first + k]
        out += [0] * (k - len(out))
        wrong = (first * 2654435761 >> 9) % 3  # 0: all right, 1: the first wrong, 2: the second wrong
        if wrong and wrong <= len(out):
            out[wrong - 1] = (out[wrong - 1] + 1) % 300
        return out
    monkeypatch.setattr(Drafter, "draft", draft)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_identical_to_plain_decoding_whatever_the_drafts(engine, tiny_model_dir, monkeypatch, params, rollback, k):
    prompt = [5 + (i * 37) % 400 for i in range(50)]
    ref = generate(engine, prompt, params)
    head = _head(engine, tiny_model_dir)
    real = generate_speculative(engine, head, prompt, params, k, rollback=rollback)  # the head's own drafts
    assert (real.token_ids, real.logprobs) == (ref.token_ids, ref.logprobs)
    _oracle_drafts(monkeypatch, prompt + ref.token_ids)
    got = generate_speculative(engine, head, prompt, params, k, rollback=rollback)
    assert (got.token_ids, got.logprobs, got.text) == (ref.token_ids, ref.logprobs, ref.text)
    assert 0 < got.accepted_tokens < got.draft_tokens  # drafts were accepted and rejected along the way
    assert sum(got.accepted_at) == got.accepted_tokens


def _path_spy(monkeypatch) -> dict[str, int]:
    """Counts of the verify pass's two ways through a DeltaNet layer (speculative.step_states: two parts;
    speculative._positions: whole decode steps per position)."""
    from qwenpd.engine import speculative

    calls = {"step_states": 0, "_positions": 0}
    for name in calls:
        real = getattr(speculative, name)

        def spy(*args, real=real, name=name, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(speculative, name, spy)
    return calls


def _without_step_kernel(monkeypatch) -> None:
    """As on a machine where the delta rule's C++ step kernel could not be built (kernels/gated_delta_rule/cpu.py):
    decode steps and verify passes run its torch code."""
    from qwenpd.kernels.gated_delta_rule import cpu

    monkeypatch.setattr(cpu, "ready", False)
    monkeypatch.setattr(cpu, "load", lambda: False)


@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
def test_whole_decode_steps_per_position_where_no_step_kernel_is_built(engine, tiny_model_dir, monkeypatch, rollback):
    """Without the delta rule's C++ step kernel the verify pass runs every position as a whole decode step of the
    recurrence (speculative._split_kernels): the tokens of plain decoding on the same (torch) code."""
    _without_step_kernel(monkeypatch)
    prompt = [5 + (i * 37) % 400 for i in range(50)]
    ref = generate(engine, prompt, SAMPLED)
    _oracle_drafts(monkeypatch, prompt + ref.token_ids)
    calls = _path_spy(monkeypatch)
    got = generate_speculative(engine, _head(engine, tiny_model_dir), prompt, SAMPLED, 3, rollback=rollback)
    assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs)
    assert 0 < got.accepted_tokens < got.draft_tokens
    assert calls["_positions"] > 0 and calls["step_states"] == 0


@pytest.mark.parametrize("kernel", [True, False], ids=["two-part", "whole-steps"])
@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
def test_a_batch_verifies_and_rolls_back_as_plain_steps(engine, monkeypatch, rollback, kernel):
    """Three sequences of different lengths in one verify pass, feeding 3, 1 and 4 tokens and keeping 2, 1 and 3
    of them (the first and the last rolled back, at row offsets 0 and 4): every fed position's logits, and the
    logits of the step after the rollback, are those of plain decode steps of each sequence alone, bit for bit;
    with the C++ step kernel the pass ran in two parts, without it in whole steps."""
    from qwenpd.engine import DecodeBatch
    from qwenpd.kernels.gated_delta_rule import cpu

    if kernel and not cpu.load():
        pytest.skip(f"no delta-rule step kernel here: {cpu.why_not}")
    if not kernel:
        _without_step_kernel(monkeypatch)
    prompts = [[5 + (i * 37 + 11 * n) % 400 for i in range(n)] for n in (20, 33, 27)]
    fed = [[7, 8, 9], [10], [11, 12, 13, 14]]
    consumed, after = [2, 1, 3], [21, 22, 23]
    want, want_after = [], []
    for prompt, f, c, a in zip(prompts, fed, consumed, after):
        _, state = engine.prefill(prompt)
        alone = DecodeBatch(engine, 1)
        alone.add(state)
        want.append(torch.cat([alone.step([t]) for t in f]))
        _, state = engine.prefill(prompt)
        alone = DecodeBatch(engine, 1)
        alone.add(state)
        for t in f[:c]:
            alone.step([t])
        want_after.append(alone.step([a]))
    batch = DecodeBatch(engine, 3)
    for prompt in prompts:
        batch.add(engine.prefill(prompt)[1])
    calls = _path_spy(monkeypatch)
    done = batch.verify(fed, rollback)
    for b in range(3):
        assert torch.equal(done.logits[done.rows(b)], want[b]), b
    batch.accept(consumed)
    got_after = batch.step(after)
    for b in range(3):
        assert torch.equal(got_after[b:b + 1], want_after[b]), b
    assert [s.num_tokens for s in batch.states] == [len(p) + c + 1 for p, c in zip(prompts, consumed)]
    assert (calls["step_states"] > 0) == kernel and (calls["_positions"] > 0) != kernel


def test_auto_rollback_snapshots_small_two_part_passes_and_replays_the_rest(engine, monkeypatch):
    """The default rollback: per-position copies for a two-part pass (the CPU step kernel) of up to
    SNAPSHOT_MAX_SEQUENCES sequences (cheaper to undo), one copy and a replay for larger passes and for passes of
    whole steps (compiled regions, no step kernel); the kept bytes are what the way taken keeps."""
    from qwenpd.engine import DecodeBatch
    from qwenpd.engine.speculative import SNAPSHOT_MAX_SEQUENCES, rollback_bytes
    from qwenpd.kernels.gated_delta_rule import cpu

    def kept(n: int, rollback: str):
        batch = DecodeBatch(engine, n)
        for i in range(n):
            batch.add(engine.prefill([5 + i, 9, 11, 13])[1])
        done = batch.verify([[7, 8, 9]] * n, rollback)
        batch.accept([1] * n)
        for state in list(batch.states):
            batch.remove(state)
            state.release()
        return done.rollback, rollback_bytes(done)

    two_part = "snapshot" if cpu.load() else "replay"
    for n, way in ((1, two_part), (SNAPSHOT_MAX_SEQUENCES, two_part), (SNAPSHOT_MAX_SEQUENCES + 1, "replay")):
        assert kept(n, "auto") == (way, kept(n, way)[1]), n
    _without_step_kernel(monkeypatch)
    assert kept(1, "auto")[0] == "replay"


@pytest.mark.parametrize("variant", ["text", "every2nd", "conv5_tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_checkpoints_with_an_added_head(hf_checkpoint, tmp_path, monkeypatch, variant, dtype):
    """Other shapes (attention every 2nd layer, conv kernel 5, tied embeddings), bf16 too, over 3 attention tiles
    of context: identical to plain decoding with the head's drafts and with mostly-right ones."""
    path = with_mtp_head(hf_checkpoint(variant), tmp_path / "ckpt")
    eng = Engine(path, dtype=dtype, speculative=True)
    head = eng.draft_head
    prompt = torch.randint(1, eng.config.vocab_size, (700,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = generate(eng, prompt, params, chunk_size=512)
    assert generate_speculative(eng, head, prompt, params, 3).token_ids == ref.token_ids
    _oracle_drafts(monkeypatch, prompt + ref.token_ids)
    got = generate_speculative(eng, head, prompt, params, 3)
    assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs) and got.accepted_tokens > 0


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_tensor_parallel_speculation_is_plain_decoding(hf_checkpoint, tmp_path, monkeypatch, params):
    """TP 2: verify and accept run on every rank in lockstep, the head on the leader alone (its own whole
    embedding and lm_head: load_head). The tokens and log-probabilities of plain decoding at the same degree, with
    the head's drafts and with mostly-right ones; greedy, the unsharded engine's tokens too."""
    path = with_mtp_head(hf_checkpoint("text"), tmp_path / "ckpt")
    eng = Engine(path, dtype="float32", tp=2, threads=1, speculative=True)
    try:
        head = eng.draft_head
        assert head.embed is not None and head.draft_head is not None
        prompt = torch.randint(1, eng.config.vocab_size, (90,), generator=torch.Generator().manual_seed(4)).tolist()
        ref = generate(eng, prompt, params, chunk_size=32)
        got = generate_speculative(eng, head, prompt, params, 3, chunk_size=32)
        assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs)
        if params is GREEDY:
            assert ref.token_ids == generate(Engine(path, dtype="float32"), prompt, params, chunk_size=32).token_ids
        _oracle_drafts(monkeypatch, prompt + ref.token_ids)
        got = generate_speculative(eng, head, prompt, params, 3, chunk_size=32, rollback="snapshot")
        assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs)
        assert 0 < got.accepted_tokens < got.draft_tokens
    finally:
        eng.close()


def _chi2_two_sample(a: list, b: list, min_count: int = 10) -> tuple[float, int]:
    """Pearson's two-sample chi-square over the categories of a and b (those with fewer than min_count in both
    pooled into one); (statistic, degrees of freedom)."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    keep = [c for c in set(ca) | set(cb) if ca[c] + cb[c] >= min_count]
    rows = [(ca[c], cb[c]) for c in keep]
    rest = (len(a) - sum(x for x, _ in rows), len(b) - sum(y for _, y in rows))
    if sum(rest):
        rows.append(rest)
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in rows:
        total = x + y
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    return stat, len(rows) - 1


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - alpha (z: the normal quantile; 3.09 = alpha 0.001), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_sampled_tokens_have_the_target_distribution(engine, tiny_model_dir, monkeypatch):
    """Speculative rejection sampling leaves the output distribution the target's: the first two tokens of 300
    seeded speculative runs (K = 1, the draft at the second token always the same likely token) against 300 plain
    runs with other seeds, two-sample chi-square at alpha = 0.001. Power: the control below, a naive acceptance
    that keeps the draft whenever it could have been sampled, is rejected by the same test (the draft's
    probability there is about 0.3, the control makes it 1 whenever the draft is offered)."""
    head = _head(engine, tiny_model_dir)
    prompt = [5 + (i * 37) % 400 for i in range(20)]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)  # a draft for the 2nd
    import dataclasses

    plain = [tuple(generate(engine, prompt, dataclasses.replace(params, seed=10_000 + s)).token_ids[:2])
             for s in range(300)]
    firsts = {}
    for x1, x2 in plain:
        firsts.setdefault(x1, []).append(x2)
    x1_mode = max(firsts, key=lambda t: len(firsts[t]))
    seconds = firsts[x1_mode]
    draft = max(set(seconds), key=seconds.count)  # a likely second token after the likeliest first one
    monkeypatch.setattr(Drafter, "draft", lambda self, hidden, next_tokens, start, k: [draft] * k)
    spec = []
    accepted = 0
    for s in range(300):
        r = generate_speculative(engine, head, prompt, dataclasses.replace(params, seed=s), 1)
        spec.append(tuple(r.token_ids[:2]))
        accepted += r.accepted_tokens
    assert 0 < accepted < 300  # the draft was both kept and replaced
    stat, df = _chi2_two_sample(spec, plain)
    assert stat < _chi2_critical(df), f"chi-square {stat:.1f} on {df} degrees of freedom"
    naive = [(x1, draft) for x1, _ in spec]  # the control: the draft kept whenever offered
    stat, df = _chi2_two_sample(naive, plain)
    assert stat > _chi2_critical(df), "the test cannot tell a biased sampler from the target"
