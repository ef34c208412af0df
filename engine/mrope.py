"""Multimodal rotary positions (mRoPE) of a prompt, as transformers' Qwen3_5Model.get_rope_index lays them out.

Every token has three positions (temporal, height, width). A text token has the same number in all three,
counting on from the token before. A run of vision tokens (one image, or one frame of a video: frames are
separated by their timestamp text) of merged grid (t, h, w) takes positions start + (frame, row, column), and the
text after it resumes at start + max(h, w): fewer positions than tokens, so from there on a token's position is
its index plus `delta` (negative). Decode needs only that delta (the hand-off carries it, engine/state_spec.py).

Which rotary frequencies turn with which of the three positions is the layer's business (engine/layers.py Rotary).
Plain bookkeeping: lists of ints, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VisionSpan:
    """A contiguous run of vision placeholder tokens: from token index `start`, a merged grid of (t, h, w)
    language-model tokens (t*h*w of them)."""

    start: int
    t: int
    h: int
    w: int

    @property
    def length(self) -> int:
        return self.t * self.h * self.w

    @property
    def end(self) -> int:
        return self.start + self.length


def rope_positions(num_tokens: int, spans: list[VisionSpan]) -> tuple[list[tuple[int, int, int]], int]:
    """(positions [(t, h, w)] of tokens 0..num_tokens-1, delta): `delta` = the next position - num_tokens, what a
    token after the last one adds to its index. ValueError if spans overlap, are out of order or out of range."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for span in spans:
        if span.start < len(out) or span.end > num_tokens or min(span.t, span.h, span.w) < 1:
            raise ValueError(f"vision span {span} overlaps another or lies outside the {num_tokens} tokens")
        for _ in range(span.start - len(out)):  # the text before it
            out.append((pos, pos, pos))
            pos += 1
        for f in range(span.t):
            for r in range(span.h):
                for c in range(span.w):
                    out.append((pos + f, pos + r, pos + c))
        pos += max(span.h, span.w)
    for _ in range(num_tokens - len(out)):
        out.append((pos, pos, pos))
        pos += 1
    return out, pos - num_tokens
