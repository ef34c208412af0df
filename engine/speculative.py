"""Speculative decoding with the checkpoint's MTP head: K drafts per step, one verify pass of K+1 positions.

**Identical output, by construction.** The verify pass (`verify`) computes each of its K+1 positions with the
decode step's own kernels, so every position's logits are the bits a plain decode step would give there:

- projections, norms, MLPs and the lm_head see the K+1 positions as K+1 rows, and the decode step is row
  invariant (engine/linear.py, runner.decode_row_multiple: a row's result does not depend on the rows beside it);
- attention writes the K+1 positions' K/V, then runs the decode attention op with one row per position, row i
  seeing context p+i+1 (fixed-width tiles: the same sums as a decode step at that position);
- the DeltaNet conv and delta rule, the only sequential part, run position after position with the decode step's
  kernels on the sequence's state (a row of the padded width a decode step uses).

The tokens are then chosen position by position with the request's own Sampler, exactly as plain decoding would
choose them, stopping at the first position whose token differs from the draft: every emitted token is sampled
from the target model's distribution given the tokens before it, with one draw of the request's random stream per
position. So greedy and seeded sampling give the non-speculative tokens, and a crash resume (which replays draws
per position) is unchanged. With the head's drafts taken greedily this *is* speculative rejection sampling: the
draft d is accepted with probability p(d) (= min(1, p(d)/q(d)) for a point-mass draft q), and a rejected
position's token is distributed as p without d, renormalised: the residual distribution.

**Rollback** of rejected drafts: the paged KV needs none (positions past the accepted ones are overwritten later);
the DeltaNet conv and recurrent state do. Two ways, `ROLLBACKS`:
- "replay": copy the state before the verify pass and keep each position's conv input, decay and write strength
  (a ring of inputs, as ReplaySSM does); on a rejection restore the copy and replay the accepted positions'
  recurrence only (no matmuls). Memory: one state copy per sequence.
- "snapshot": copy the state after every position; on a rejection restore the copy after the last accepted one.
  Memory: K+1 state copies per sequence.
bench/spec_decode.py measures both; "replay" is the default (module doc of the bench says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenpd.engine.mtp import MTPCache, MTPHead
from qwenpd.engine.state import HybridState
from qwenpd.kernels import ops

ROLLBACKS = ("replay", "snapshot")


@dataclass(slots=True)
class _Layer:
    """What one DeltaNet layer's rollback needs: the state before the pass (or after each position) and, for a
    replay, each position's conv input, decay and write strength."""

    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (conv, recurrent) copies
    mixed: torch.Tensor | None = None  # [n, conv_dim] fp32: conv inputs
    g: torch.Tensor | None = None
    beta: torch.Tensor | None = None


@dataclass(slots=True)
class Verified:
    logits: torch.Tensor  # [n, V] fp32: the logits after each fed token
    hidden: torch.Tensor  # [n, H] the final-normed hidden states (what the MTP head reads)
    start: int  # the state's num_tokens before the pass
    tokens: list[int]
    layers: dict[int, _Layer]
    rollback: str


def _rows(state_row: torch.Tensor, width: int) -> torch.Tensor:
    """The sequence's state as the first of `width` rows (a decode step's padded batch), a view when width is 1."""
    if width == 1:
        return state_row[None]
    out = torch.zeros((width, *state_row.shape), dtype=state_row.dtype, device=state_row.device)
    out[0] = state_row
    return out


def _recur(mixer, kernels, mixed_i: torch.Tensor, g_i: torch.Tensor, beta_i: torch.Tensor, conv: torch.Tensor,
           rec: torch.Tensor, width: int) -> torch.Tensor:
    """One position of a DeltaNet layer's recurrence, as a decode step of `width` rows whose first row is this
    sequence (conv [width, D, W-1], rec [width, Hv, dk, dv] updated in place). Returns the core output [1, Hv, dv]."""
    pad = width - 1

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if not pad else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])

    m = kernels.conv_update(rows(mixed_i), mixer.conv_weight, conv)
    q, k, v = mixer._split_heads(m)
    return kernels.step(q, k, v, rows(g_i), rows(beta_i), rec)[:1]


def verify(engine, state: HybridState, tokens: list[int], rollback: str = "replay") -> Verified:
    """Feed `tokens` (the last sampled token and the drafts) to `state` in one pass; their logits are a plain
    decode step's at each position (module doc). `state` is left after all of them: `accept` rolls it back."""
    if rollback not in ROLLBACKS:
        raise ValueError(f"rollback must be one of {ROLLBACKS}, got {rollback!r}")
    model, n, p = engine.model, len(tokens), state.num_tokens
    width = engine.eager.row_multiple
    state.reserve(p + n)
    dev = model.device
    positions = torch.arange(p, p + n, device=dev)
    slots = torch.tensor(state.kv.slots(p, p + n), dtype=torch.long, device=dev)
    tables = torch.tensor(state.kv.table(), dtype=torch.long, device=dev)[None].expand(n, -1).contiguous()
    cache = state.kv.cache
    layers: dict[int, _Layer] = {}
    with torch.inference_mode():
        x = model.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=dev))
        for blk in model.blocks:
            j = model.slot[blk.index]
            mixer = blk.mixer
            h = blk.norm(x)
            if blk.is_linear:
                mixed, z, beta, g = mixer._project(h)
                conv, rec = _rows(state.conv[j], width), _rows(state.recurrent[j], width)
                keep = layers[j] = _Layer()
                if rollback == "replay":
                    keep.saved.append((state.conv[j].clone(), state.recurrent[j].clone()))
                    keep.mixed, keep.g, keep.beta = mixed, g, beta
                outs = []
                for i in range(n):
                    outs.append(_recur(mixer, model.kernels, mixed[i:i + 1], g[i:i + 1], beta[i:i + 1], conv, rec,
                                       width))
                    if rollback == "snapshot":
                        keep.saved.append((conv[0].clone(), rec[0].clone()))
                if width != 1:  # scratch rows: the state is their first row
                    state.conv[j].copy_(conv[0])
                    state.recurrent[j].copy_(rec[0])
                out = mixer._output(torch.cat(outs), z)
            else:
                q, gate, k, v = mixer._qkv(h, positions)
                ops.decode_write_kv(cache.k[j], cache.v[j], slots, k, v)
                o = ops.decode_paged_attention(q, cache.k[j], cache.v[j], tables, positions + 1, mixer.scale)
                out = mixer.o_proj(o.reshape(n, -1) * torch.sigmoid(gate.float()))
            x = blk.finish(x, out)
        logits = model.logits(x)
        hidden = model.final_normed(x)
    state.num_tokens = p + n
    state.token_ids.extend(tokens)
    return Verified(logits, hidden, p, list(tokens), layers, rollback)


def accept(engine, state: HybridState, done: Verified, consumed: int) -> None:
    """Keep the first `consumed` fed tokens (1 <= consumed <= len(tokens)): roll the DeltaNet state back to just
    after them and forget the rest (their KV is overwritten later)."""
    n = len(done.tokens)
    if not 1 <= consumed <= n:
        raise ValueError(f"consumed must be in [1, {n}], got {consumed}")
    if consumed < n:
        model, width = engine.model, engine.eager.row_multiple
        with torch.inference_mode():
            for blk in model.blocks:
                if not blk.is_linear:
                    continue
                j = model.slot[blk.index]
                keep = done.layers[j]
                if done.rollback == "snapshot":
                    conv, rec = keep.saved[consumed - 1]
                    state.conv[j].copy_(conv)
                    state.recurrent[j].copy_(rec)
                    continue
                conv0, rec0 = keep.saved[0]
                state.conv[j].copy_(conv0)
                state.recurrent[j].copy_(rec0)
                conv, rec = _rows(state.conv[j], width), _rows(state.recurrent[j], width)
                for i in range(consumed):
                    _recur(blk.mixer, model.kernels, keep.mixed[i:i + 1], keep.g[i:i + 1], keep.beta[i:i + 1],
                           conv, rec, width)
                if width != 1:
                    state.conv[j].copy_(conv[0])
                    state.recurrent[j].copy_(rec[0])
    state.num_tokens = done.start + consumed
    del state.token_ids[done.start + consumed:]


def rollback_bytes(done: Verified) -> int:
    """Bytes the pass kept for a rollback (state copies and replay inputs)."""
    total = 0
    for keep in done.layers.values():
        total += sum(c.numel() * c.element_size() + r.numel() * r.element_size() for c, r in keep.saved)
        total += sum(t.numel() * t.element_size() for t in (keep.mixed, keep.g, keep.beta) if t is not None)
    return total


class Drafter:
    """One sequence's drafts: the MTP head's KV and how far the head has read the verified tokens."""

    def __init__(self, head: MTPHead, vocab: int | None):
        self.head = head
        self.cache: MTPCache = head.new_cache()
        self.vocab = vocab  # tokens the tokenizer has: drafts never pick embedding padding

    def _pick(self, logits: torch.Tensor) -> int:
        return int(torch.argmax(logits if self.vocab is None else logits[:self.vocab]))

    def draft(self, hidden: torch.Tensor, next_tokens: list[int], start: int, k: int) -> list[int]:
        """Feed the verified pairs (hidden[i] of position start+i, the token after it) and draft k tokens after
        the last: greedily, each draft's output hidden chained into the next."""
        dev = hidden.device
        with torch.inference_mode():
            positions = torch.arange(start, start + len(next_tokens), device=dev)
            out, logits = self.head.forward(hidden, torch.tensor(next_tokens, device=dev), positions, self.cache)
            drafts = [self._pick(logits[-1])]
            h, pos = out[-1:], start + len(next_tokens)
            for step in range(1, k):
                h, logits = self.head.forward(h, torch.tensor(drafts[-1:], device=dev), torch.tensor([pos], device=dev),
                                              self.cache, step)
                drafts.append(self._pick(logits[-1]))
                pos += 1
        return drafts
