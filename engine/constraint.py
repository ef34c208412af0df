"""Constrained decoding: which tokens a grammar allows next, with llguidance (Earley parser + lazy lexer over the
tokenizer's trie; no ahead-of-time grammar compilation, so a new schema per request costs nothing up front).

A request asks for it with `SamplingParams.structured_output`, a JSON object (the same text in the protobuf
`SamplingParams.structured_output`, so it crosses the hand-off and a crash resume with the other options):

    {"type": "json_schema", "schema": {...}}     a JSON value valid under the schema
    {"type": "json_object"}                      any JSON object
    {"type": "regex", "pattern": "..."}          text matching the regex
    {"type": "lark", "grammar": "..."}           llguidance's Lark dialect (what tool calls compile to)
    optional: "after": "</think>"                 free text until this string has been generated, then the grammar
                                                   (a thinking model constrains the answer, not the reasoning)

The grammar state is a pure function of the tokens generated so far, so prefill (which samples the first token)
and decode (the rest) each build it from the request and the tokens before: nothing but the options crosses the
split. Masks cover the model's whole vocabulary: rows past the tokenizer (real checkpoints pad the embedding)
are never allowed. Once the grammar is complete only the sequence's ending ids (EOS) may follow (where none may, as
before min_tokens, or where the library hits one of its limits, sampling raises ConstraintError: the request
fails saying why, never with text outside the grammar); JSON is generated without free whitespace (llguidance's
default separators), so a bounded schema ends in a bounded number of tokens.

Masks are computed off the critical path: once a token is sampled the next position's mask depends on nothing
else, so `Sampler.sample` starts it (`prefetch`) on a worker thread at once, and it runs (llguidance drops the GIL)
while decode's next forward pass runs; `allowed` then only waits for it. Only where a core is free for it
(Grammars.prefetch: the engine says; on a CPU whose cores all run the forward it would only slow it down).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("json_schema", "json_object", "regex", "lark")
_KEYS = {"json_schema": ("schema",), "json_object": (), "regex": ("pattern",), "lark": ("grammar",)}  # and "after"
THINK_END = "</think>"  # where a thinking model's reasoning ends
_MASKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenpd-mask")  # prefetched masks, one at a time
PREFETCH = True  # off: never prefetch (bench/constrained.py measures both ways)
COMPACT = {"whitespace_flexible": False}  # JSON with fixed separators: no whitespace for a model to loop in


class ConstraintError(ValueError):
    """A structured_output the grammar library refuses (the message says why)."""


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits [V] to -inf where llguidance's packed mask (int32 words, bit j of word w = token 32w + j)
    has a 0 bit, and past the mask's end. llguidance's own helper (llguidance.torch.apply_token_bitmask_inplace)
    is torch.compile'd: importing it and its first call in a process took 4-8 s here (the first structured-output
    request of every prefill and decode service waited for them) and it needs a C++ compiler; unpacked with
    numpy, a mask of a 248K-token vocabulary costs ~0.2 ms a token on this CPU (compiled: ~0.06 ms)."""
    import numpy as np

    words = bitmask.numpy().astype("<i4", copy=False)  # little-endian: bit j of a word is bit j % 8 of byte j // 8
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").view(np.bool_)
    n = min(bits.size, logits.numel())
    logits[:n].masked_fill_(torch.from_numpy(bits[:n]).logical_not().to(logits.device), float("-inf"))
    logits[n:] = float("-inf")


def grammar_of(spec: dict[str, Any]) -> str:
    """llguidance's grammar text for a parsed structured_output object (ConstraintError naming a key its type does
    not take: a misspelt option is never ignored)."""
    import llguidance

    kind = spec.get("type")
    unknown = sorted(set(spec) - {"type", "after", *_KEYS.get(kind, set(spec))})
    if unknown:
        raise ConstraintError(f"{kind} takes no {unknown[0]!r} (its keys: type, {', '.join(_KEYS[kind] + ('after',))})")
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError("json_schema needs a 'schema' object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=COMPACT)
    if kind == "regex":
        if not isinstance(spec.get("pattern"), str):
            raise ConstraintError("regex needs a 'pattern' string")
        return llguidance.LLMatcher.grammar_from_regex(spec["pattern"])
    if kind == "lark":
        if not isinstance(spec.get("grammar"), str):
            raise ConstraintError("lark needs a 'grammar' string")
        return llguidance.LLMatcher.grammar_from_lark(spec["grammar"])
    raise ConstraintError(f"type must be one of {KINDS}, got {kind!r}")


def parse_spec(text: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ConstraintError("must be a JSON object")
    if "after" in spec and (not isinstance(spec["after"], str) or not spec["after"]):
        raise ConstraintError("'after' must be a non-empty string")
    return spec


class Grammars:
    """One engine's constraint factory: the tokenizer as llguidance sees it (built once) and the model's vocabulary
    size (the mask's length)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int | None, prefetch: bool = True):
        import llguidance

        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=eos_token_id)
        self.vocab_size = vocab_size
        self.words = self.tokenizer.vocab_size  # tokens the tokenizer has; model rows past it are padding
        self.prefetch = prefetch  # compute a sequence's next mask on a worker thread as soon as it can be

    def check(self, structured_output: str) -> None:
        """ConstraintError (saying why) unless `structured_output` is a spec llguidance accepts; builds no
        matcher (the sampler does, on the worker)."""
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar_of(parse_spec(structured_output)), self.tokenizer)
        if is_error:
            raise ConstraintError("; ".join(m.strip() for m in messages) or "the grammar is not valid")

    def make(self, structured_output: str, ending_ids: frozenset[int]) -> "Constraint":
        import llguidance

        spec = parse_spec(structured_output)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_of(spec))
        if matcher.is_error():
            raise ConstraintError(matcher.get_error())
        return Constraint(self, matcher, ending_ids, spec.get("after"))


@dataclass(eq=False)
class Constraint:
    """One sequence's grammar state. `advance` every generated token (in order), `mask` before sampling."""

    grammars: Grammars
    matcher: Any
    ending_ids: frozenset[int]
    after: str | None = None  # free text until this has been generated
    _tail: str = ""  # the end of the free text so far (to find `after` across token boundaries)
    _bitmask: torch.Tensor | None = None  # llguidance's packed mask, reused step after step
    _pending: Future | None = None  # the next position's mask being filled (prefetch)
    _fresh: bool = False  # _bitmask is the current position's mask (filled since the last advance)

    @property
    def active(self) -> bool:
        return self.after is None

    def advance(self, token: int) -> None:
        self._settle()  # the matcher is not shared between threads
        self._fresh = False
        if not self.active:
            if token < self.grammars.words:
                self._tail = (self._tail + self.grammars.tokenizer.decode_str([token]))[-4 * len(self.after):]
            if self.after in self._tail:
                self.after = None  # from the next token on, the grammar rules
            return
        if token in self.ending_ids and self.matcher.is_accepting():
            return
        self.matcher.consume_token(token)

    def warm(self) -> None:
        """Compute the current position's mask now, on the calling thread: a service builds a sequence's constraint
        off its stepping thread and warms it there, so a costly grammar's first mask (the library's lexer is
        built lazily) does not stall the batch."""
        self._settle()
        if self.active and not self._fresh and not (self.matcher.is_stopped() or self.matcher.is_error()):
            self._fill()

    def prefetch(self) -> None:
        """Start filling the next position's mask on the worker thread (after the last `advance`)."""
        if PREFETCH and self.grammars.prefetch and self.active and self._pending is None and not self._fresh and \
                not (self.matcher.is_stopped() or self.matcher.is_error()):
            self._pending = _MASKS.submit(self._fill)

    def _settle(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _fill(self) -> None:
        """The matcher's mask of the next position into _bitmask (int32 words, as llguidance.torch's helpers
        allocate and fill it; that module is not imported: it torch.compiles at import, ~3 s)."""
        if self._bitmask is None:
            self._bitmask = torch.full(((self.grammars.words + 31) // 32,), -1, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        self._fresh = True

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every token the grammar does not allow now set to -inf (ending ids allowed where the
        grammar is complete; all tokens, free text, before `after`)."""
        if not self.active:
            return logits
        self._settle()  # first: the worker may still hold the matcher (llguidance refuses a second user)
        m = self.matcher
        if m.is_error():  # a limit of the library (a grammar too costly to follow) or a bug: never text past it
            raise ConstraintError(f"the grammar cannot be followed further: {m.get_error()}")
        if m.is_stopped():
            out = torch.full_like(logits, float("-inf"))
        else:
            if not self._fresh:  # neither prefetched nor warmed
                self._fill()
            out = logits.clone()
            apply_bitmask(out, self._bitmask)
            eos = self.grammars.tokenizer.eos_token
            if eos is not None and eos < out.numel() and eos not in self.ending_ids:
                out[eos] = float("-inf")  # the library's own end marker: ours are ending_ids
        ending = [t for t in self.ending_ids if t < logits.numel()]
        done = m.is_accepting() or m.is_stopped()
        if ending and (done or not torch.isfinite(out).any()):  # complete, or a dead end: the sequence may end
            idx = torch.tensor(ending, device=logits.device)
            out[idx] = logits[idx]
        if not torch.isfinite(out).any():  # never text outside the grammar: the request fails, saying why
            raise ConstraintError("no token may follow here: the grammar is complete (or allows no token the "
                                  "model has) and what would end the sequence is held back (min_tokens) or missing")
        return out
