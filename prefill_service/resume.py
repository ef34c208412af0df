"""Resuming a request whose decode service failed mid-stream (PrefillRequest.resume_generated).

The client sends prompt + the tokens it already received as the new prompt (the prefix cache makes this
cheap) with `resume_generated = n`. To continue exactly where the stream broke off, prefill must pick up the
same state the failed decode had: the random stream after n draws, the max_tokens budget less n, and the
output tracker's held-back text (a possible stop-string start, an incomplete UTF-8 character). Replaying the
n tokens through a fresh OutputTracker reproduces that state; the Handoff carries it to decode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwenpd.engine.engine import Engine
from qwenpd.engine.output import OutputTracker
from qwenpd.engine.sampling import SamplingParams
from qwenpd.errors import InvalidArgument


@dataclass(slots=True, frozen=True)
class Resume:
    """How a resumed request continues: options with the remaining budget, draws already made, held-back text."""

    params: SamplingParams
    draws: int = 0
    pending_text: str = ""
    detok_unread: int = 0


def resume_point(params: SamplingParams, ids: list[int], generated: int, engine: Engine) -> Resume:
    """`ids` = original prompt + `generated` tokens already streamed; InvalidArgument if that cannot be resumed."""
    if generated == 0:
        return Resume(params)
    if generated >= len(ids):
        raise InvalidArgument("resume_generated", f"{generated} is not less than the prompt's {len(ids)} tokens")
    if generated >= params.max_tokens:
        raise InvalidArgument("resume_generated", f"{generated} tokens already reach max_tokens {params.max_tokens}")
    prompt, done = ids[:-generated], ids[-generated:]
    tracker = OutputTracker(params, engine.eos_token_ids, engine.tokenizer, prompt)
    for token in done:
        tracker.push(token)
        if tracker.finish_reason is not None:
            raise InvalidArgument("resume_generated", "the tokens already generated finish the sequence")
    pending, unread = tracker.held_back()
    return Resume(dataclasses.replace(params, max_tokens=params.max_tokens - generated), generated, pending, unread)
