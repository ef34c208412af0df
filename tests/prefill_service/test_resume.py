"""Resuming a sequence after n generated tokens (prefill_service.resume + OutputTracker.restore) continues its
output exactly: the same text, held-back stop-string starts and split UTF-8 characters included, at every n."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwenpd.engine.output import OutputTracker
from qwenpd.engine.sampling import SamplingParams
from qwenpd.errors import InvalidArgument
from qwenpd.handoff import PROMPT_TAIL
from qwenpd.prefill_service.resume import resume_point

TEXT = "Tea: héllo wörld, 你好 🙂 — then xy stop ab and more text after it"


def _emitted(tracker: OutputTracker, ids: list[int]) -> list[str]:
    return [tracker.push(t) for t in ids]


@pytest.mark.parametrize("stop", [(), ("xy s", "🙂 —"), ("ab and", "wörld,")], ids=["nostop", "stop1", "stop2"])
def test_resume_at_every_token_continues_the_output_exactly(engine, stop):
    tok = engine.tokenizer
    prompt = tok.encode("Prompt:")
    generated = tok.encode(TEXT)
    params = SamplingParams(temperature=0, max_tokens=len(generated) + 5, stop=stop, ignore_eos=True)
    whole = OutputTracker(params, engine.eos_token_ids, tok, prompt)
    pieces = []
    for t in generated:
        pieces.append(whole.push(t))
        if whole.finish_reason is not None:
            break
    used = generated[:len(pieces)]
    fake = SimpleNamespace(eos_token_ids=engine.eos_token_ids, tokenizer=tok)
    held = set()
    for n in range(1, len(used)):
        ids = prompt + used[:n]
        r = resume_point(params, ids, n, fake)
        assert r.draws == n and r.params.max_tokens == params.max_tokens - n
        tail = ids[-(PROMPT_TAIL + r.detok_unread):]
        rest = OutputTracker(r.params, engine.eos_token_ids, tok, tail)
        rest.restore(r.pending_text, r.detok_unread)
        out = "".join(pieces[:n]) + "".join(_emitted(rest, used[n:]))
        assert out == whole.text, f"resumed after {n} tokens"
        assert rest.finish_reason == whole.finish_reason
        held |= {"text"} if r.pending_text else set()
        held |= {"bytes"} if r.detok_unread else set()
    assert held == ({"text", "bytes"} if stop else {"bytes"})  # both kinds of held-back output were resumed


def test_resume_point_refuses_what_cannot_be_resumed(engine):
    fake = SimpleNamespace(eos_token_ids=engine.eos_token_ids, tokenizer=engine.tokenizer)
    params = SamplingParams(max_tokens=4, ignore_eos=False)
    with pytest.raises(InvalidArgument):
        resume_point(params, [1, 2, 3], 3, fake)  # nothing left of the prompt
    with pytest.raises(InvalidArgument):
        resume_point(params, [1, 2, 3, 4, 5, 6], 4, fake)  # max_tokens reached
    eos = sorted(engine.eos_token_ids)[0]
    with pytest.raises(InvalidArgument):
        resume_point(params, [1, 2, eos], 1, fake)  # already finished
    assert resume_point(params, [1, 2], 0, fake).params == params
