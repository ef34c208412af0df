"""Speculative decoding in the decode service's stepping loop (decode_service/runner.py): sequences with and
without drafts in one batch, every step one verify pass, and each sequence's tokens and log-probabilities those of
plain decoding, greedy and seeded sampling, with the head's own drafts and with mostly-right ones (every
accept/reject pattern), while the batch drafts and while it is too large to."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from qwenpd.decode_service import runner as runner_mod
from qwenpd.decode_service.runner import DecodeRunner, DecodeSequence, ReadGuard
from qwenpd.engine.generate import generate
from qwenpd.engine.mtp import MTPCache, MTPHead, PromptDrafts
from qwenpd.engine.output import OutputTracker
from qwenpd.engine.pages import kv_tokens
from qwenpd.engine.sampling import Sampler, SamplingParams
from qwenpd.engine.speculative import Drafter
from qwenpd.engine.weights import load_mtp_weights

K = 3
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, seed=11, max_tokens=30, ignore_eos=True)
PROMPTS = [[5 + (i * 37) % 400 for i in range(50)], [7 + (i * 13) % 300 for i in range(23)],
           [9 + (i * 71) % 450 for i in range(70)]]
MAX_TOKENS = [30, 12, 20]  # so the batch shrinks as they finish


def _params(params: SamplingParams, i: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=MAX_TOKENS[i])


@pytest.fixture
def engine(spec_engine):
    """This module's engine on the tiny model: with the MTP head's KV layers in its paged cache."""
    return spec_engine


@pytest.fixture(scope="module")
def head(spec_engine, tiny_model_dir):
    engine = spec_engine
    return MTPHead(engine.config, load_mtp_weights(tiny_model_dir, engine.config, engine.dtype), engine.model)


def _sequence(engine, head, prompt: list[int], params: SamplingParams, rid: str, drafts: bool, k: int = K):
    """A sequence as the decode service makes one from a hand-off: prefill (with the head's state when it
    drafts, k a step), the first token sampled."""
    sampler = Sampler.resumed(params, 0, engine.eos_token_ids, grammars=engine.grammars, prompt=prompt)
    state = engine.new_state()
    feed = PromptDrafts(head, prompt, state) if drafts else None
    logits, state = engine.prefill(prompt, state, normed=feed)
    token, logprob = sampler.sample(logits)
    seq = DecodeSequence(request_id=rid, load=lambda: state, guard=ReadGuard(lambda: None), sampler=sampler,
                         tracker=OutputTracker(params, engine.eos_token_ids, engine.tokenizer, prompt),
                         next_token=token, num_tokens=len(prompt), max_context=engine.config.max_position_embeddings,
                         kv_tokens=kv_tokens(len(prompt), 0, params.max_tokens, engine.config.max_position_embeddings,
                                             k if drafts else 0),
                         draft=feed.tensors() if feed is not None else None)
    first = seq.push(token, logprob)
    return seq, (list(first.token_ids), list(first.logprobs))


class Delivered:
    """A DecodeRunner's `deliver`: the outputs per request id, and a wait for requests to end (error or finish)."""

    def __init__(self):
        self.outputs: dict[str, list] = {}
        self.arrived = threading.Condition()

    def deliver(self, items) -> None:
        with self.arrived:
            for seq, out in items:
                self.outputs.setdefault(seq.request_id, []).append(out)
            self.arrived.notify_all()

    def ended(self, rid: str) -> bool:
        return any(o.error is not None or o.finish_reason is not None for o in self.outputs.get(rid, []))

    def wait(self, rids: list[str], timeout: float = 120) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: all(self.ended(r) for r in rids), timeout=timeout)


def _run(engine, head, monkeypatch, params, max_batch: int, speculative_max_batch: int, policy: str = "always"):
    """Every prompt through one DecodeRunner (the second without drafts); each one's (token ids, logprobs), the
    verify passes' (sequences drafting, drafts, accepted per position), each one's [text, finish reason]."""
    monkeypatch.setattr(engine, "draft_head", head)
    got: dict[str, tuple[list[int], list[float]]] = {}
    texts: dict[str, list] = {}  # streamed text, finish reason
    finished = threading.Event()
    seqs = []

    def deliver(items):
        for seq, out in items:
            assert out.error is None, out.error
            got[seq.request_id][0].extend(out.token_ids)
            got[seq.request_id][1].extend(out.logprobs)
            texts.setdefault(seq.request_id, ["", None])[0] += out.text
            texts[seq.request_id][1] = out.finish_reason
            if all(s.finish_reason is not None for s in seqs):
                finished.set()

    runner = DecodeRunner(lambda: engine, max_batch, 8, deliver, num_speculative_tokens=K,
                          speculative_max_batch=speculative_max_batch, speculative_policy=policy)
    steps = []
    runner.on_verify = lambda n, drafted, at: steps.append((n, drafted, list(at)))
    runner.start()
    try:
        for i, prompt in enumerate(PROMPTS):
            seq, first = _sequence(engine, head, prompt, _params(params, i), f"r{i}", drafts=i != 1)
            got[seq.request_id] = first
            texts[seq.request_id] = [seq.tracker.text, None]
            seqs.append(seq)
        for seq in seqs:
            runner.submit(seq)
        assert finished.wait(120)
    finally:
        runner.stop()
    return got, steps, texts


def _serve(runner: DecodeRunner, seq: DecodeSequence, finished: threading.Event) -> None:
    """Run `seq` alone through `runner` until `finished` is set."""
    runner.start()
    try:
        runner.submit(seq)
        assert finished.wait(120)
    finally:
        runner.stop()


def _reference(engine, params):
    return {f"r{i}": generate(engine, p, _params(params, i)) for i, p in enumerate(PROMPTS)}


def _oracle(monkeypatch, refs):
    """Drafts that are the right tokens except where the position says otherwise (all right, the first wrong,
    the second wrong), the head still fed every verified position."""
    current = {}
    plain = DecodeRunner._drafter

    def drafter_of(self, seq):
        current["ids"] = PROMPTS[int(seq.request_id[1:])] + refs[seq.request_id].token_ids
        return plain(self, seq)

    class Oracle(Drafter):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.ids = current["ids"]

        def draft(self, hidden, next_tokens, start, k):  # the first drafts, at join
            return self.draft_many([self], [hidden], [next_tokens], [start], k)[0]

        @classmethod
        def draft_many(cls, drafters, hidden, next_tokens, starts, k):
            Drafter.draft_many(drafters, hidden, next_tokens, starts, 0)  # the head still reads every position
            out = []
            for d, tokens, start in zip(drafters, next_tokens, starts):
                first = start + len(tokens) + 1
                drafts = (d.ids[first:first + k] + [0] * k)[:k]
                wrong = (first * 2654435761 >> 9) % 3
                if k and wrong and wrong <= len(drafts):
                    drafts[wrong - 1] = (drafts[wrong - 1] + 1) % 300
                out.append(drafts)
            return out

    monkeypatch.setattr(DecodeRunner, "_drafter", drafter_of)
    monkeypatch.setattr(runner_mod, "Drafter", Oracle)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_speculation_is_plain_decoding(engine, head, monkeypatch, params):
    refs = _reference(engine, params)
    want = {rid: (r.token_ids, r.logprobs) for rid, r in refs.items()}
    got, steps, _ = _run(engine, head, monkeypatch, params, max_batch=4, speculative_max_batch=4)
    assert got == want  # the tiny model's random head: drafts rejected
    assert steps and all(n <= 2 for n, _, _ in steps)  # the second sequence never drafts
    _oracle(monkeypatch, refs)
    got, steps, _ = _run(engine, head, monkeypatch, params, max_batch=4, speculative_max_batch=4)
    assert got == want
    accepted = [sum(at) for _, _, at in steps]
    drafted = sum(d for _, d, _ in steps)
    assert 0 < sum(accepted) < drafted  # accepted and rejected along the way
    assert any(at[K - 1] for _, _, at in steps)  # all K drafts of a step accepted somewhere


def test_a_batch_past_speculative_max_batch_drafts_nothing(engine, head, monkeypatch):
    refs = _reference(engine, GREEDY)
    _oracle(monkeypatch, refs)
    got, steps, _ = _run(engine, head, monkeypatch, GREEDY, max_batch=4, speculative_max_batch=1)
    assert got == {rid: (r.token_ids, r.logprobs) for rid, r in refs.items()}
    # drafts only once a single sequence is left (the longest-running one), and right ones are accepted then
    assert steps and all(n == 1 for n, _, _ in steps) and sum(sum(at) for _, _, at in steps) > 0


@pytest.mark.parametrize("replay", [1, 2, 10])
def test_a_resumed_sequence_replays_k_plus_1_tokens_a_pass(engine, head, monkeypatch, replay):
    """A resumed sequence joins with tokens streamed before a failure still to feed: they ride in the verify
    pass K+1 at a time (each position the bits of a decode step), and the tokens after them are plain
    decoding's. Here a hand-off whose first `replay` + 1 tokens were streamed already."""
    monkeypatch.setattr(engine, "draft_head", head)
    params = dataclasses.replace(GREEDY, max_tokens=24)
    ref = generate(engine, PROMPTS[0], params)
    seq, _ = _sequence(engine, head, PROMPTS[0], params, "r0", drafts=True)
    for token, logprob in zip(ref.token_ids[1:replay + 1], ref.logprobs[1:replay + 1]):
        seq.push(token, logprob)  # streamed before the failure
    seq.next_token = ref.token_ids[0]
    seq.replay.extend(ref.token_ids[1:replay + 1])
    got: tuple[list[int], list[float]] = ([], [])
    finished = threading.Event()

    def deliver(items):
        for _, out in items:
            assert out.error is None, out.error
            got[0].extend(out.token_ids)
            got[1].extend(out.logprobs)
            if out.finish_reason is not None:
                finished.set()

    runner = DecodeRunner(lambda: engine, 1, 8, deliver, num_speculative_tokens=K, speculative_max_batch=1,
                          speculative_policy="always")
    per_pass: list[int] = []
    runner.on_replay = per_pass.append
    _serve(runner, seq, finished)
    assert got == (ref.token_ids[replay + 1:], ref.logprobs[replay + 1:])  # the bits of plain decoding
    assert sum(per_pass) == replay and len(per_pass) == -(-replay // (K + 1))  # K+1 a pass, the last fewer


def test_prompt_drafts_are_the_heads_state_over_the_prompt(engine, head):
    """PromptDrafts, chunk by chunk, gives the head's KV of one pass over the whole prompt."""
    prompt = PROMPTS[0]
    state = engine.new_state()
    feed = PromptDrafts(head, prompt, state)
    engine.prefill(prompt, state, chunk_size=7, normed=feed)
    t = feed.tensors()
    state.release()
    normed: list = []
    engine.prefill(prompt, chunk_size=len(prompt), normed=normed)[1].release()
    hidden = torch.cat(normed)
    cache = MTPCache.new(engine.kv_cache, len(prompt))
    head.forward(hidden[:-1], torch.tensor(prompt[1:]), torch.arange(len(prompt) - 1), cache)
    want = cache.copy_out(0, len(prompt) - 1)
    assert t["mtp.0.k"].shape == (engine.config.num_key_value_heads, len(prompt) - 1, engine.config.head_dim)
    torch.testing.assert_close(t["mtp.0.k"], want["mtp.0.k"])
    torch.testing.assert_close(t["mtp.0.v"], want["mtp.0.v"])
    torch.testing.assert_close(t["mtp.hidden"], hidden[-1])


def test_stop_strings_and_stop_ids_end_where_plain_decoding_ends(engine, head, monkeypatch):
    """A stop string or stop id inside a run of accepted drafts ends the stream there: the same tokens, text
    (the stop string and what follows never emitted) and finish reason as plain decoding."""
    free = generate(engine, PROMPTS[0], _params(GREEDY, 0))
    params = dataclasses.replace(GREEDY, ignore_eos=True, stop=(free.text[12:15],),
                                 stop_token_ids=(free.token_ids[20],))
    refs = _reference(engine, params)
    assert refs["r0"].finish_reason == "stop" and len(refs["r0"].token_ids) < len(free.token_ids)
    _oracle(monkeypatch, refs)
    got, steps, texts = _run(engine, head, monkeypatch, params, max_batch=4, speculative_max_batch=4)
    assert got == {rid: (r.token_ids, r.logprobs) for rid, r in refs.items()}
    assert {rid: tuple(t) for rid, t in texts.items()} == {rid: (r.text, r.finish_reason)
                                                              for rid, r in refs.items()}
    assert sum(sum(at) for _, _, at in steps) > 0


@pytest.mark.parametrize("policy", ["always", "adaptive"])
def test_a_decode_side_checkpoint_carries_the_heads_state_at_its_position(engine, head, monkeypatch, policy):
    """With --decode-checkpoint-every, a drafting sequence's checkpoint carries the draft state a hand-off at its
    position would (state_spec.draft_shapes: the head's KV of positions 0 .. N-2 and the hidden state at N-1),
    so a stream resumed from it drafts again: the head's state over the same tokens, computed by a prefill.
    Adaptive: the tiny model's random head drafts poorly, so the policy soon stops drafting and the head reads
    late (plain steps keep its input; a checkpoint makes it catch up first)."""
    from qwenpd.engine import state_spec
    from qwenpd.handoff import StreamRecord, prompt_digest

    monkeypatch.setattr(engine, "draft_head", head)
    prompt = PROMPTS[0]
    seq, first = _sequence(engine, head, prompt, GREEDY, "r0", drafts=True)
    seq.stream = StreamRecord(prompt_digest(prompt), len(prompt), len(prompt), 0, tuple(prompt[-8:]))
    checkpoints, ids = [], list(first[0])
    finished = threading.Event()

    def deliver(items):
        for s, out in items:
            assert out.error is None, out.error
            ids.extend(out.token_ids)
            if out.checkpoint is not None:
                checkpoints.append((out.record.num_tokens, out.checkpoint))
            if out.finish_reason is not None:
                finished.set()

    runner = DecodeRunner(lambda: engine, 2, 8, deliver, checkpoint_every=8, num_speculative_tokens=K,
                          speculative_max_batch=2, speculative_policy=policy)
    plain_steps = []
    runner.on_plain_step = lambda: plain_steps.append(1)
    _serve(runner, seq, finished)
    assert len(checkpoints) >= 2
    assert bool(plain_steps) == (policy == "adaptive")
    c = engine.config
    for n, tensors in checkpoints:
        expected = state_spec.handoff_shapes(c, n)
        assert {name: tuple(t.shape) for name, t in tensors.items()} == dict(expected)  # every group present
        tokens = (prompt + ids)[:n]
        state = engine.new_state()
        feed = PromptDrafts(head, tokens, state)
        engine.prefill(tokens, state, normed=feed)
        want = feed.tensors()
        state.release()
        for name in want:
            torch.testing.assert_close(tensors[name].float(), want[name].float(), atol=3e-2, rtol=3e-2, msg=name)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_the_adaptive_policy_stops_drafting_for_a_head_that_drafts_poorly(engine, head, monkeypatch, params):
    """The tiny model's random head is almost never right: under the adaptive policy the batch drafts only
    while the policy measures (MIN_SAMPLES drafting steps per batch size), then steps plainly, its heads reading
    late; the tokens are plain decoding's throughout."""
    from qwenpd.decode_service.policy import MIN_SAMPLES

    refs = _reference(engine, params)
    got, steps, _ = _run(engine, head, monkeypatch, params, max_batch=4, speculative_max_batch=4,
                         policy="adaptive")
    assert got == {rid: (r.token_ids, r.logprobs) for rid, r in refs.items()}
    assert 0 < len(steps) <= MIN_SAMPLES * len(PROMPTS)  # batches of 3, 2 and 1 sequences


def test_read_many_scores_the_first_draft_at_each_position(engine, head):
    """A catch-up pass (Drafter.read_many) leaves the head's KV a position-by-position feed leaves, and counts
    the positions where its first draft is the token that came next."""
    prompt = PROMPTS[0]
    normed: list = []
    engine.prefill(prompt, normed=normed)[1].release()
    hidden = torch.cat(normed)
    tokens = prompt[1:] + [prompt[0]]
    def drafter() -> Drafter:
        return Drafter(head, None, MTPCache.new(engine.kv_cache, len(prompt) + 1))

    many, one = drafter(), drafter()
    n = len(prompt)
    hits, scored = Drafter.read_many([many], [hidden], [tokens], [0], scored=n)
    want = 0
    for i in range(n):
        draft = one.draft(hidden[i:i + 1], [tokens[i]], i, 1)[0]
        want += i + 1 < n and draft == tokens[i + 1]
    assert scored == n - 1 and hits == want
    for name, t in many.cache.copy_out(0, n).items():
        torch.testing.assert_close(t, one.cache.copy_out(0, n)[name])
    # tokens that are the head's own first drafts, each fed after the one before: all scored right
    chain, right = drafter(), [tokens[0]]
    for i in range(n - 1):
        right += chain.draft(hidden[i:i + 1], right[-1:], i, 1)
    assert Drafter.read_many([drafter()], [hidden], [right], [0], scored=n) == (n - 1, n - 1)
    # by default the last 32 positions with a token after them are scored
    assert Drafter.read_many([drafter()], [hidden], [right], [0]) == (32, 32)


def test_the_heads_drafts_past_the_last_token_have_pages(engine, head, monkeypatch):
    """The head's KV sits in the sequence's pages (mtp.MTPCache), reserved up front to kv_tokens as the decode
    service reserves them: with K = 8 and every draft right, its drafts near the end write up to K - 2 positions
    past the last token the sequence can consume. Here prompt + max_tokens is a whole number of pages, so those
    positions are on pages only kv_tokens' draft allowance adds: the sequence runs to its end with the tokens of
    plain decoding (without the allowance the head's write is refused: OutOfPages)."""
    monkeypatch.setattr(engine, "draft_head", head)
    page = engine.kv_cache.page_size
    prompt = PROMPTS[0]
    params = dataclasses.replace(GREEDY, max_tokens=page + -len(prompt) % page)
    ref = generate(engine, prompt, params)
    right = prompt + ref.token_ids
    real = Drafter.draft_many.__func__

    def draft_many(cls, drafters, hidden, next_tokens, starts, k):
        real(cls, drafters, hidden, next_tokens, starts, k)  # the head writes its draft positions
        first = starts[0] + len(next_tokens[0]) + 1
        return [(right[first:first + k] + [0] * k)[:k]]

    monkeypatch.setattr(Drafter, "draft_many", classmethod(draft_many))
    seq, got = _sequence(engine, head, prompt, params, "r0", drafts=True, k=8)
    state = seq.load()
    state.reserve(seq.kv_tokens)  # as state_from_checkpoint reserves them (decode_service/state.py)
    seq.load = lambda: state
    finished = threading.Event()
    accepted, errors = [], []

    def deliver(items):
        for _, out in items:
            got[0].extend(out.token_ids)
            got[1].extend(out.logprobs)
            if out.error is not None:
                errors.append(out.error)
            if out.finish_reason is not None or out.error is not None:
                finished.set()

    runner = DecodeRunner(lambda: engine, 1, 8, deliver, num_speculative_tokens=8, speculative_max_batch=1,
                          speculative_policy="always")
    runner.on_verify = lambda n, drafted, at: accepted.append(sum(at))
    _serve(runner, seq, finished)
    assert not errors, errors[0]
    assert got == (ref.token_ids, ref.logprobs) and max(accepted) == 8


@pytest.mark.parametrize("drafting", [False, True], ids=["plain-step", "verify-pass"])
def test_one_sequence_whose_sampling_fails_ends_alone_the_batch_goes_on(engine, head, monkeypatch, drafting):
    """A sequence that cannot sample (its grammar cannot go on; anything raising in its sampler) gets its error,
    with the tokens it made before in the same step, and leaves; the others of the batch, drafting or not, go on
    with the tokens of plain decoding, and the loop serves later sequences."""
    monkeypatch.setattr(engine, "draft_head", head)
    refs = _reference(engine, GREEDY)
    got = Delivered()
    outputs = got.outputs
    runner = DecodeRunner(lambda: engine, 4, 8, got.deliver, num_speculative_tokens=K, speculative_max_batch=8,
                          speculative_policy="always")
    runner.start()
    try:
        seqs = [_sequence(engine, head, p, _params(GREEDY, i), f"r{i}", drafts=drafting)[0]
                for i, p in enumerate(PROMPTS)]
        # r0's sampler fails on its 6th draw: its constraint-like error must not touch r1 and r2
        bad = seqs[0].sampler
        plain_sample = Sampler.sample

        def failing(self, logits):
            if self is bad and self.draws == 5:
                raise runner_mod.ConstraintError("the grammar cannot be followed further: lexer fuel exhausted")
            return plain_sample(self, logits)

        bad.params = dataclasses.replace(bad.params, logit_bias=((1, 0.0),))  # through its sampler, not argmax
        monkeypatch.setattr(Sampler, "sample", failing)
        for seq in seqs:
            runner.submit(seq)
        got.wait([s.request_id for s in seqs])
        (err,) = [o.error for o in outputs["r0"] if o.error is not None]
        assert err.status == "INVALID_ARGUMENT" and err.field == "sampling.structured_output"
        assert "lexer fuel exhausted" in str(err)
        made = [t for o in outputs["r0"] for t in o.token_ids]
        assert [refs["r0"].token_ids[0], *made] == refs["r0"].token_ids[:5]  # what it made before, all of it
        for rid in ("r1", "r2"):
            assert all(o.error is None for o in outputs[rid])
            assert [refs[rid].token_ids[0], *(t for o in outputs[rid] for t in o.token_ids)] == refs[rid].token_ids
        assert runner.load_info().active == 0
        later = _sequence(engine, head, PROMPTS[1], _params(GREEDY, 1), "later", drafts=drafting)[0]
        runner.submit(later)
        got.wait(["later"])
        assert [refs["r1"].token_ids[0], *(t for o in outputs["later"] for t in o.token_ids)] == refs["r1"].token_ids
    finally:
        runner.stop()
