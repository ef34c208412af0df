"""Turning sampled tokens into output: stop conditions, streamed text with stop strings held back, and the
in-process generation loop used by `qwenpd generate --model` (the services use `OutputTracker` too)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from engine.engine import DecodeBatch
from engine.sampling import Sampler, SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass(slots=True)
class OutputTracker:
    """Accumulates one sequence's generated tokens and decides when it is finished.

    `push(token)` returns the text that may be streamed now. Text that could still turn into a stop string is
    held back; a matched stop string and everything after it is never emitted. EOS and stop ids end the
    sequence without adding their text.
    """

    params: SamplingParams
    eos_token_ids: frozenset[int]
    tokenizer: Tokenizer | None = None
    prompt_ids: Sequence[int] = ()
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _detok: IncrementalDetokenizer | None = None
    _pending: str = ""

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids)

    def push(self, token_id: int, logprob: float = 0.0) -> str:
        if self.finish_reason is not None:
            raise RuntimeError("sequence already finished")
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        is_stop_id = token_id in self.params.stop_token_ids or (
            not self.params.ignore_eos and token_id in self.eos_token_ids)
        if is_stop_id:
            self.finish_reason = FINISH_STOP
            return self._flush()
        delta = self._detok.push(token_id) if self._detok is not None else ""
        out = self._add_text(delta)
        if self.finish_reason is None and len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = FINISH_LENGTH
            out += self._flush()
        return out

    def held_back(self) -> tuple[str, int]:
        """(text held back as a possible stop-string start, ids not yet detokenized): what a tracker resuming
        this sequence elsewhere needs (`restore`) to continue its output exactly."""
        return self._pending, self._detok.unread if self._detok is not None else 0

    def restore(self, pending_text: str, unread: int) -> None:
        """Continue a sequence another tracker started: `prompt_ids` end with the tokens it had generated."""
        self._pending = pending_text
        if self.tokenizer is not None and unread:
            self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, unread)

    def _add_text(self, delta: str) -> str:
        if not self.params.stop:
            self.text += delta
            return delta
        pending = self._pending + delta
        hits = [(pending.find(s), s) for s in self.params.stop if s in pending]
        if hits:
            cut = min(i for i, _ in hits)
            self.finish_reason = FINISH_STOP
            self._pending = ""
            self.text += pending[:cut]
            return pending[:cut]
        # hold back the longest tail that is a proper prefix of some stop string
        hold = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        emit, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
        self.text += emit
        return emit

    def finish(self, reason: str) -> str:
        """End the sequence from outside (e.g. the context is full); returns the held-back text, now final."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._flush()

    def _flush(self) -> str:
        out, self._pending = self._pending, ""
        self.text += out
        return out


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    prefill_s: float
    decode_s: float


def generate(engine, prompt_ids: Sequence[int], params: SamplingParams, chunk_size: int = 512,
             on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Prefill, sample the first token from the last logits, then decode one token per step until finished."""
    sampler = Sampler(params)
    tracker = OutputTracker(params, engine.eos_token_ids, engine.tokenizer, prompt_ids)
    t0 = time.perf_counter()
    logits, state = engine.prefill(prompt_ids, chunk_size=chunk_size)
    token, logprob = sampler.sample(logits)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    batch = DecodeBatch(engine, max_batch=1)
    batch.add(state)
    while True:
        delta = tracker.push(token, logprob)
        if on_text is not None and delta:
            on_text(delta)
        if tracker.finish_reason is not None:
            break
        logits = batch.step([token])[0]
        token, logprob = sampler.sample(logits)
    decode_s = time.perf_counter() - t1
    return GenerationResult(tracker.token_ids, tracker.text, tracker.finish_reason, tracker.logprobs,
                            prefill_s, decode_s)
