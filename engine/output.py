"""Turning sampled tokens into output: stop conditions (eos, stop tokens, stop strings, length) and streamed text
with stop strings and incomplete UTF-8 held back. Used by the in-process loop (`engine/generate.py`), the decode
service and prefill's resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from qwenpd.engine.sampling import SamplingParams
from qwenpd.engine.tokenizer import IncrementalDetokenizer, Tokenizer

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass(slots=True)
class OutputTracker:
    """Accumulates one sequence's generated tokens and decides when it is finished.

    `push(token)` returns the text that may be streamed now. Text that could still turn into a stop string is
    held back; a matched stop string and everything after it is never emitted. EOS and stop ids end the
    sequence without adding their text. An incomplete UTF-8 character is held back until a later token completes
    it; when the sequence ends first (any finish reason but a stop string), its bytes are emitted as U+FFFD.
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
        """The end of the sequence: the held-back text and the tokens not yet detokenized, now final."""
        tail = self._detok.flush() if self._detok is not None else ""
        out = self._add_text(tail) if tail else ""
        rest, self._pending = self._pending, ""
        self.text += rest
        return out + rest
