"""Constrained decoding on a random-weight model (engine/constraint.py with llguidance): whatever the weights
say, the output follows the grammar and a bounded schema ends in a bounded number of tokens; the grammar state is
rebuilt exactly from the tokens generated so far (what crosses the hand-off and a resume); model rows past the
tokenizer are never sampled."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qwenpd.engine.constraint import ConstraintError
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import Sampler, SamplingParams

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 30},
                                           "hot": {"type": "boolean"}},
          "required": ["city", "days", "hot"], "additionalProperties": False}


def _spec(**kw) -> str:
    return json.dumps(kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_bounded_schema_is_followed_and_finished(engine, temperature):
    prompt = engine.tokenizer.encode("Weather please:")
    for seed in range(4):
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=60,
                                structured_output=_spec(type="json_schema", schema=SCHEMA))
        out = generate(engine, prompt, params)
        assert out.finish_reason == "stop", out.text  # ended by EOS within 60 tokens
        value = json.loads(out.text)
        assert value["city"] in ("Paris", "Oslo", "Lima") and 1 <= value["days"] <= 30 and isinstance(value["hot"], bool)



def test_lark_tool_call_and_regex(engine):
    lark = ('start: "<tool_call>\\n<function=get_weather>\\n<parameter=city>\\n" /[A-Z][a-z]{1,8}/ '
            '"\\n</parameter>\\n</function>\\n</tool_call>"')
    prompt = engine.tokenizer.encode("Call a tool:")
    out = generate(engine, prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=80,
                                                  structured_output=_spec(type="lark", grammar=lark)))
    assert out.finish_reason == "stop" and out.text.startswith("<tool_call>\n<function=get_weather>\n")
    out = generate(engine, prompt, SamplingParams(temperature=1.0, seed=4, max_tokens=20,
                                                  structured_output=_spec(type="regex", pattern="[0-9]{3}-[a-c]{2}")))
    assert out.finish_reason == "stop" and len(out.text) == 6 and out.text[3] == "-"


def test_a_grammar_that_cannot_go_on_fails_the_request_never_text_outside_it(engine):
    """Where nothing the grammar allows may come next (it is complete and min_tokens holds EOS back) or the
    library's matcher stopped in error (one of its limits), sampling raises ConstraintError saying why: the
    request fails, it does not end as "stop" nor go on unconstrained."""
    prompt = engine.tokenizer.encode("Digit:")
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=5,
                            structured_output=_spec(type="regex", pattern="[0-9]"))
    with pytest.raises(ConstraintError, match="grammar is complete .* held back"):
        generate(engine, prompt, params)
    sampler = Sampler.resumed(dataclasses.replace(params, min_tokens=0), 0, engine.eos_token_ids, (),
                              engine.grammars)
    digit = int(torch.argmax(sampler.constraint.allowed(torch.zeros(engine.config.vocab_size))))
    assert engine.tokenizer.decode([digit]).isdigit()
    sampler.constraint.matcher.consume_token(engine.tokenizer.encode("x")[0])  # not allowed: the matcher errs
    assert sampler.constraint.matcher.is_error()
    with pytest.raises(ConstraintError, match="cannot be followed further"):
        sampler.sample(torch.zeros(engine.config.vocab_size))


def test_free_text_until_after_then_the_grammar(engine):
    """A thinking model: the reasoning is free, the answer after </think> is constrained."""
    think = engine.tokenizer.encode("let me see</think>")
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=60,
                            structured_output=_spec(type="json_schema", schema=SCHEMA, after="</think>"))
    sampler = Sampler.resumed(params, 0, engine.eos_token_ids, (), engine.grammars)
    assert not sampler.constraint.active
    sampler.seen(think)  # the free part, as if generated
    assert sampler.constraint.active
    logits = torch.zeros(engine.config.vocab_size)
    token, _ = sampler.sample(logits)
    assert engine.tokenizer.decode([token]).startswith("{")


def test_the_state_rebuilt_from_the_tokens_gives_the_same_masks(engine):
    """Prefill samples the first token, decode the rest, a resume replays: each rebuilds the grammar state from
    the tokens so far, and must allow exactly what the live one allows."""
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=60,
                            structured_output=_spec(type="json_schema", schema=SCHEMA))
    out = generate(engine, engine.tokenizer.encode("Again:"), params)
    logits = torch.randn(engine.config.vocab_size, generator=torch.Generator().manual_seed(0))
    live = Sampler.resumed(params, 0, engine.eos_token_ids, (), engine.grammars)
    for n, token in enumerate(out.token_ids[:-1]):
        rebuilt = Sampler.resumed(params, n, engine.eos_token_ids, out.token_ids[:n], engine.grammars)
        assert torch.equal(rebuilt.constraint.allowed(logits), live.constraint.allowed(logits)), f"after {n}"
        live.seen((token,))


def test_padding_rows_past_the_tokenizer_are_never_allowed(engine):
    params = SamplingParams(temperature=1.0, seed=0, structured_output=_spec(type="json_object"))
    sampler = Sampler.resumed(params, 0, engine.eos_token_ids, (), engine.grammars)
    logits = torch.zeros(engine.config.vocab_size + 1000)
    logits[-1000:] = 100.0  # padding rows the model loves
    allowed = sampler.constraint.allowed(logits)
    assert torch.isinf(allowed[engine.grammars.words:]).all()


@pytest.mark.parametrize("spec", ['{"type": "json_schema"}', '{"type": "nope"}', "not json", '{"type": "regex", '
                                  '"pattern": "(["}', '{"type": "lark", "grammar": "start: missing"}'])
def test_bad_specs_are_refused_with_the_reason(engine, spec):
    with pytest.raises(ConstraintError):
        engine.grammars.check(spec)


def test_a_key_the_type_does_not_take_is_refused_not_ignored(engine):
    for spec, key in (('{"type": "regex", "pattern": "[ab]{3}", "bogus": 1}', "bogus"),
                      ('{"type": "json_object", "schema": {}}', "schema"),
                      ('{"type": "json_schema", "schema": {}, "strict": true}', "strict")):
        with pytest.raises(ConstraintError, match=f"takes no '{key}'"):
            engine.grammars.check(spec)
    engine.grammars.check('{"type": "regex", "pattern": "[ab]{3}", "after": "</think>"}')


def test_padding_rows_are_never_sampled_unconstrained_either(engine):
    """A real checkpoint pads its embedding past the tokenizer (Qwen3.6: 248,320 rows); those rows are no token."""
    from qwenpd.engine.sampling import greedy_batch

    words = engine.grammars.words
    logits = torch.zeros(words + 64)
    logits[words:] = 50.0
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)):
        sampler = Sampler.resumed(params, 0, engine.eos_token_ids, (), engine.grammars)
        assert all(sampler.sample(logits)[0] < words for _ in range(20))
    ids, _ = greedy_batch(torch.stack([logits, logits]), words)
    assert ids == [int(torch.argmax(logits[:words]))] * 2


def test_prefetched_masks_give_the_same_tokens(engine):
    """A mask prefetched on the worker thread (started as each token is sampled) is the mask computed at sampling:
    the same seeded, constrained sequence either way. The mask computation is slowed down so every next step finds
    it still running: nothing touches the matcher until it is done (llguidance refuses a second user of a
    matcher: "Already mutably borrowed", as a service saw under load)."""
    import time

    from qwenpd.engine import constraint

    class Guarded:
        """The matcher, with llguidance's rule made visible: a call while a mask is being computed fails."""

        def __init__(self, matcher):
            self.matcher, self.busy = matcher, False

        def unsafe_compute_mask_ptr(self, *args):
            self.busy = True
            time.sleep(0.003)  # a big vocabulary's mask: still computing when the next step comes
            try:
                return self.matcher.unsafe_compute_mask_ptr(*args)
            finally:
                self.busy = False

        def __getattr__(self, name):
            if self.busy:
                raise RuntimeError("Already mutably borrowed")
            return getattr(self.matcher, name)

    params = SamplingParams(temperature=1.0, seed=4, max_tokens=40,
                            structured_output=_spec(type="json_schema", schema=SCHEMA))
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(engine.config.vocab_size, generator=g) for _ in range(40)]
    runs = []
    for prefetch in (False, True):
        grammars = engine.grammars
        before = grammars.prefetch
        grammars.prefetch = prefetch
        try:
            sampler = Sampler.resumed(params, 0, engine.eos_token_ids, (), grammars)
            sampler.constraint.matcher = Guarded(sampler.constraint.matcher)
            runs.append([sampler.sample(x)[0] for x in logits])
            assert (sampler.constraint._pending is not None) == (prefetch and constraint.PREFETCH
                                                                 and not sampler.constraint.matcher.is_stopped())
        finally:
            grammars.prefetch = before
    assert runs[0] == runs[1]


@pytest.mark.parametrize("vocab", [64, 100, 130])
def test_apply_bitmask_equals_the_bit_by_bit_reference(vocab):
    """engine.constraint.apply_bitmask against its plain reference: token t allowed iff bit t % 32 of word
    t // 32; logits past the mask's words (a model's padded rows) are -inf. Sign bits included."""
    from qwenpd.engine.constraint import apply_bitmask

    g = torch.Generator().manual_seed(vocab)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (3,), generator=g, dtype=torch.int64).to(torch.int32)
    words[0] = -1  # every bit
    logits = torch.randn(vocab, generator=g)
    want = logits.clone()
    for t in range(vocab):
        if t >= 32 * len(words) or not (int(words[t // 32]) >> (t % 32)) & 1:
            want[t] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, words)
    assert torch.equal(got, want)


def test_a_constrained_token_compiles_nothing(tiny_model_dir):
    """The first constrained request of a process waits for no torch.compile (llguidance.torch compiles its mask
    helper at import and on first use: seconds, in every prefill and decode service)."""
    import subprocess
    import sys

    code = f"""
import json, sys, torch
from qwenpd.engine.constraint import Grammars
from qwenpd.engine.tokenizer import Tokenizer
tok = Tokenizer({str(tiny_model_dir)!r})
g = Grammars(tok.to_json(), tok.vocab_size + 7, None)
c = g.make(json.dumps({{"type": "json_object"}}), frozenset())
out = c.allowed(torch.zeros(tok.vocab_size + 7))
assert torch.isfinite(out).sum() > 0 and not torch.isfinite(out[tok.vocab_size:]).any()
print(sorted(m for m in ("llguidance.torch", "torch._dynamo", "torch._inductor") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_warmed_constraint_computes_its_first_mask_once_where_it_was_warmed(engine, monkeypatch):
    """decode builds a sequence's constraint and warms it on a worker thread: the stepping thread's first sample
    then uses that mask (no second computation), and the masks after it are computed as before."""
    from qwenpd.engine import constraint
    from qwenpd.engine.constraint import Constraint

    monkeypatch.setattr(constraint, "PREFETCH", False)  # every mask where sample needs it (a many-core machine)
    prompt = engine.tokenizer.encode("Weather please:")
    params = SamplingParams(temperature=0, max_tokens=60, structured_output=_spec(type="json_schema", schema=SCHEMA))
    want = generate(engine, prompt, params).token_ids
    fills = []
    plain_fill = Constraint._fill
    monkeypatch.setattr(Constraint, "_fill", lambda self: (fills.append(1), plain_fill(self))[1])
    sampler = Sampler.resumed(params, 1, engine.eos_token_ids, want[:1], engine.grammars, prompt=prompt)
    sampler.constraint.warm()
    sampler.constraint.warm()  # already fresh: nothing more
    assert len(fills) == 1
    state = engine.new_state()
    logits, state = engine.prefill(prompt + want[:1], state)
    token, _ = sampler.sample(logits)
    assert token == want[1] and len(fills) == 1  # the warmed mask, not a second one
    token, _ = sampler.sample(engine.decode([state], [token])[0])
    assert token == want[2] and len(fills) == 2  # the next position's, computed as before
