"""Speculative decoding with the checkpoint's MTP head: K drafts per step, one verify pass of K+1 positions per
sequence, every sequence of a decode batch in the same pass.

**Identical output, by construction.** The verify pass (`verify`) computes each of its positions with the decode
step's own kernels, so every position's logits are the bits a plain decode step would give there:

- projections, norms, MLPs and the lm_head see every sequence's positions as rows, and the decode step is row
  invariant (engine/linear.py, runner.decode_row_multiple: a row's result does not depend on the rows beside it);
- attention writes the positions' K/V, then runs the decode attention op with one row per position, the row of
  position p+i of a sequence seeing context p+i+1 (fixed-width tiles: the same sums as a decode step there);
- the DeltaNet conv and delta rule, the only sequential part, run position after position with the decode step's
  kernels on the batch's slot tensors: at position i, one step over the sequences that feed more than i tokens
  (a slice of the slots when that is all of them, gathered rows otherwise; padded rows as a decode step pads).
  On the reference kernels on CPU with the delta rule's C++ step kernel (kernels/gated_delta_rule/cpu.py) every
  row's conv output (from each sequence's conv state and its earlier rows) and step inputs are computed at once,
  the same bits row by row, and then the state updates of every sequence's positions in one call of the kernel,
  each (sequence, head) its positions in turn exactly as a decode step runs one (kernels:
  causal_conv1d_update_many, step_inputs, step_states; per position and layer that was ~8 small torch calls).

A sequence that feeds one token (no drafts: speculation off for it, or no room left) gets exactly a decode step,
so sequences with and without speculation share one pass.

**Compiled graphs** (`--compile`, regional): the pass calls the compiled decode step's own regions
(HybridModel.linear_decode_in/_core/_out, .attention_decode, .normed_logits) where the eager pass calls the model's:
the row-wise ones over all its rows padded to a batch bucket (Engine.compile(verify=) compiles the buckets such
passes need). Where every sequence feeds the same number of tokens, a shape compiled for it (GraphRunner.two_part;
a batch-1 pass always), the recurrence runs in two parts as on the CPU kernels above: the region
linear_verify_inputs (the conv a token at a time and every row's step inputs: the code the recurrence region traces
before the state, traced the same way) and one step_states call; elsewhere the recurrence region once per position
on bucket-padded slot rows with dense inputs, as a decode step gives them. Compiled code is row invariant across
buckets as the eager code is (tests/engine/test_batch_invariance), so every position's logits are the compiled
decode step's bits (tests/engine/test_compiled_speculative.py, both ways).

The tokens are then chosen position by position with each request's own Sampler, exactly as plain decoding would
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
  recurrence only (no matmuls; on the reference kernels one step_states call per layer for the state updates, the
  conv state being a slice of the kept inputs). Memory: one state copy per sequence.
- "snapshot": copy the state after every position (the step kernel writes it out while it is in cache); on a
  rejection restore the copy after the last accepted one. Memory: K+1 state copies per sequence.
"auto", the default, takes "snapshot" for a two-part pass (the CPU kernels, above; eager or compiled) of at most
SNAPSHOT_MAX_SEQUENCES sequences and "replay" elsewhere: there, on `small` at batch 1 (K = 3), a snapshot pass cost
what a replay pass did and its accept 0.4 ms against 1.0-1.4 ms (`generate` with 70% oracle drafts: 1.50x -> 1.60x
plain decoding), and the copies, held for one pass in host memory, stay within a few sequences' state
(Qwen3.6-27B: ~150 MB a copy, K+1 copies a sequence). A compiled pass run position by position gained nothing from
snapshots (1.28x replay, 1.25x snapshot); in two parts, with auto's snapshots, 1.32x -> 1.50x plain compiled
decoding. On an accelerator the copies would come out of device memory that --kv-cache-bytes does not set aside.
bench/spec_decode.py measures both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from qwenpd.engine.mtp import MTPCache, MTPHead
from qwenpd.engine.pages import NULL_PAGE
from qwenpd.kernels import ops
from qwenpd.kernels.causal_conv1d.conv import causal_conv1d_update_many
from qwenpd.kernels.gated_delta_rule import cpu as delta_cpu
from qwenpd.kernels.gated_delta_rule.step import StepInputs, step_inputs, step_states

ROLLBACKS = ("replay", "snapshot")
SNAPSHOT_MAX_SEQUENCES = 2  # "auto": snapshot a pass of at most this many sequences (module doc)


@dataclass(slots=True)
class _Layer:
    """What one DeltaNet layer's rollback needs. replay: `saved` is one (conv, recurrent) copy of the batch's
    first B slots before the pass, plus every row's conv input, decay and write strength (or, where the pass ran
    the reference kernels in two parts, every row's prepared step inputs); snapshot: `snaps[i]` is (slots, conv,
    recurrent) of the sequences stepped at position i, copied after it (a two-part pass: `after`, the recurrent
    state after each row). `histories` (two-part pass): each sequence's conv inputs, from which its conv state
    after any number of its tokens is a slice."""

    saved: tuple[torch.Tensor | None, torch.Tensor] | None = None  # conv None in a two-part pass (histories)
    snaps: list[tuple[list[int], torch.Tensor, torch.Tensor]] = field(default_factory=list)
    mixed: torch.Tensor | None = None  # [R, conv_dim]: conv inputs of every row
    g: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    prepared: StepInputs | None = None
    histories: list[torch.Tensor] | None = None
    after: torch.Tensor | None = None  # [R, Hv, dk, dv]


@dataclass(slots=True)
class Verified:
    """One verify pass over a batch: row offsets[b] + i holds sequence b's position starts[b] + i."""

    logits: torch.Tensor  # [R, V] fp32: the logits after each fed token
    hidden: torch.Tensor  # [R, H] the final-normed hidden states (what the MTP head reads)
    offsets: list[int]
    starts: list[int]  # each state's num_tokens before the pass
    tokens: list[list[int]]
    layers: dict[int, _Layer]
    rollback: str
    runs: "_Runs"

    def rows(self, b: int) -> slice:
        return slice(self.offsets[b], self.offsets[b] + len(self.tokens[b]))


def _pick_rows(rows: list[int]):
    """An index for rows of a [R, ...] tensor: a slice where they are evenly spaced (no gather copy)."""
    if len(rows) == 1:
        return slice(rows[0], rows[0] + 1)
    stride = rows[1] - rows[0]
    if stride > 0 and all(b - a == stride for a, b in zip(rows, rows[1:])):
        return slice(rows[0], rows[-1] + 1, stride)
    return rows


@dataclass(frozen=True, slots=True)
class _Runs:
    """How a pass runs the decode step's parts, as the decode step runs them: `layers` has the step's regions
    (HybridModel.linear_decode_in, ..., .normed_logits: the model's own, or a runner's compiled ones), `rows(m)`
    the rows a step of m sequences runs (GraphRunner.decode_rows), `width(pages)` a block table's width."""

    layers: object
    rows: Callable[[int], int]
    width: Callable[[int], int]
    compiled: bool
    two_part: tuple[tuple[int, int], ...] = ()  # compiled: (rows, tokens) of the passes run in two parts


def _runs(engine) -> _Runs:
    """The decode step's way (module doc): the compiled regions where the engine compiled its decode graphs
    (regionally: a whole graph has no regions to run apart), the model's eager code otherwise."""
    runner = engine.runner
    if "decode" not in runner.graphs:
        return _Runs(engine.model, engine.eager.decode_rows, engine.eager.table_width, False)
    if runner.layers is None:
        raise ValueError("speculative decoding with compiled graphs needs them compiled by region (the verify pass "
                         "runs the decode step's regions; the default on CPU)")
    return _Runs(runner.layers, runner.decode_rows, runner.table_width, True, runner.two_part)


def _on_slots(slot_tensors: list[torch.Tensor], slots: list[int], batch_size: int, runs: _Runs,
              inputs: list[torch.Tensor], fn) -> torch.Tensor:
    """fn(inputs, slot rows) for the sequences in `slots` (their rows of `inputs`, in that order) as a decode step
    runs them: rows padded to runs.rows, the slots themselves when they are all of the batch (padding rows are
    then free slots, as a decode step pads), gathered rows otherwise (written back). In place on the slot tensors;
    returns the first len(slots) rows of fn's output. Compiled regions get what a decode step gives them: dense
    rows (they guard on layout), slot rows that are not inference tensors (they guard on that too)."""
    m = len(slots)
    rows = runs.rows(m)
    if runs.compiled:
        inputs = [t.contiguous() for t in inputs]
    inputs = [t if rows == m else torch.cat([t, t.new_zeros((rows - m, *t.shape[1:]))]) for t in inputs]
    if m == batch_size and slots == list(range(m)) and rows <= slot_tensors[0].shape[0]:
        return fn(inputs, [t[:rows] for t in slot_tensors])[:m]
    index = torch.tensor(slots, device=slot_tensors[0].device)
    with torch.inference_mode(False):
        gathered = [t.new_zeros((rows, *t.shape[1:])) for t in slot_tensors]
    for t, g in zip(slot_tensors, gathered):
        g[:m] = t[index]
    out = fn(inputs, gathered)[:m]
    for t, g in zip(slot_tensors, gathered):
        t[index] = g[:m]
    return out


def _step(runs: _Runs, blk, conv_all: torch.Tensor, rec_all: torch.Tensor, slots: list[int], batch_size: int,
          mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One recurrence step of a DeltaNet layer for the sequences in `slots` (their rows of mixed/beta/g), as the
    decode step runs it (its linear_decode_core, `_on_slots`). Returns the core outputs [len(slots), Hv, dv]."""
    return _on_slots([conv_all, rec_all], slots, batch_size, runs, [mixed, beta, g],
                     lambda inputs, states: runs.layers.linear_decode_core(blk, *inputs, *states))


def _split_kernels(kernels, device: torch.device) -> bool:
    """Whether the decode step runs the torch reference kernels on CPU (kernels/ops.py `direct`) with the delta
    rule's C++ step kernel, which the verify pass runs in two parts: every row's conv and step inputs at once, then
    the state updates of all positions in one kernel call (the same bits: causal_conv1d_update_many, step_inputs,
    step_states; checked on CPU). Elsewhere (the torch code of the step, where no kernel could be built; CUDA, not
    checked on a device yet; neuron's kernels) each position is a whole step of the decode step's kernels."""
    return (device.type == "cpu" and kernels.step is ops.decode_step_gated_delta_rule
            and kernels.conv_update is ops.decode_causal_conv1d_update and delta_cpu.ready)


def _conv_states(conv_all: torch.Tensor, histories: list[torch.Tensor], who: list[int], counts: list[int]) -> None:
    """Set the conv state of the sequences `who` to the one after counts[i] of their pass's tokens."""
    keep = conv_all.shape[-1]
    for b, c in zip(who, counts):
        conv_all[b].copy_(histories[b][:, c:c + keep])


def _positions(runs: _Runs, blk, conv_all: torch.Tensor, rec_all: torch.Tensor, steps: list[list[int]],
               offsets: list[int], r: int, batch_size: int, mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
               snaps: list | None) -> torch.Tensor:
    """A DeltaNet layer's recurrence over a pass's r rows position by position, each a decode step's (`_step`) over
    the sequences steps[i] that feed more than i tokens; `snaps` (snapshot rollback) gets (those sequences, their
    conv and recurrent state) after each position. The core outputs [r, Hv, dv]."""
    core = None
    for i, who in enumerate(steps):
        rows = _pick_rows([offsets[b] + i for b in who])
        o = _step(runs, blk, conv_all, rec_all, who, batch_size, mixed[rows], beta[rows], g[rows])
        if core is None:
            core = o if len(who) == r else o.new_empty((r, *o.shape[1:]))
        if core is not o:
            core[rows] = o
        if snaps is not None:
            index = torch.tensor(who, device=rec_all.device)
            snaps.append((who, conv_all[index].clone(), rec_all[index].clone()))
    return core


def _two_part(runs: _Runs, lengths: list[int]) -> bool:
    """Whether a compiled pass runs in two parts: every sequence feeds the same number of tokens, a shape compiled
    for it (GraphRunner.two_part)."""
    return all(n == lengths[0] for n in lengths) and (runs.rows(len(lengths)), lengths[0]) in runs.two_part


def _prepared(runs: _Runs, blk, conv_all: torch.Tensor, b: int, n: int, mixed: torch.Tensor, beta: torch.Tensor,
              g: torch.Tensor) -> tuple[StepInputs, list[torch.Tensor]]:
    """A compiled two-part pass's first part for the batch's b sequences (slots 0..b-1), n tokens each: the
    compiled region linear_verify_inputs over b sequences padded to a decode step's rows (the same code, traced,
    as n steps' linear_decode_core runs before the state), the prepared step inputs of the b*n real rows, and each
    sequence's conv inputs after its state (its history, as causal_conv1d_update_many gives it)."""
    rows, r = runs.rows(b), b * n
    with torch.inference_mode(False):  # as a decode step's slot rows (graphs guard on it)
        conv = conv_all.new_zeros((rows, *conv_all.shape[1:]))
    conv[:b] = conv_all[:b]
    padded = [t[:r] if rows == b else torch.cat([t[:r], t.new_zeros(((rows - b) * n, *t.shape[1:]))])
              for t in (mixed, beta, g)]
    prepared = runs.layers.linear_verify_inputs(blk, *(t.contiguous() for t in padded), conv).rows(slice(0, r))
    histories = [torch.cat([conv_all[i], mixed[i * n:(i + 1) * n].to(conv_all.dtype).t()], dim=-1) for i in range(b)]
    return prepared, histories


def verify(engine, batch, fed: list[list[int]], rollback: str = "auto") -> Verified:
    """Feed fed[b] (sequence b's last sampled token, then its drafts) to batch.states[b], all in one pass; their
    logits are a plain decode step's at each position (module doc). The states are left after all of them:
    `accept` rolls them back (`rollback`: one of ROLLBACKS, or "auto": module doc)."""
    if rollback not in (*ROLLBACKS, "auto"):
        raise ValueError(f"rollback must be one of {(*ROLLBACKS, 'auto')}, got {rollback!r}")
    states = batch.states
    if len(fed) != len(states) or any(not f for f in fed):
        raise ValueError(f"verify needs one non-empty token list per sequence of the batch ({len(states)})")
    model, dev = engine.model, engine.model.device
    limit = engine.config.max_position_embeddings
    starts = [s.num_tokens for s in states]
    if any(p + len(f) > limit for p, f in zip(starts, fed)):
        raise ValueError(f"verify pass would exceed the model's maximum context of {limit} tokens")
    flat = [t for f in fed for t in f]
    engine.check_tokens(flat)
    runs = _runs(engine)
    offsets, r = [], 0
    for f in fed:
        offsets.append(r)
        r += len(f)
    pad = runs.rows(r) - r  # whole rows for the row-wise parts, as a decode step of r rows; padding: the null page
    for s, p, f in zip(states, starts, fed):
        s.reserve(p + len(f))
    width = runs.width(max(len(s.kv.pages) for s in states))
    positions, rope, slots, tables = [], [], [], []
    for s, p, f in zip(states, starts, fed):
        positions += range(p, p + len(f))
        rope += range(p + s.rope_delta, p + s.rope_delta + len(f))  # mRoPE: shifted after a prompt's images
        slots += s.kv.slots(p, p + len(f))
        tables += [s.kv.table(width)] * len(f)

    def long(values: list) -> torch.Tensor:  # made outside inference mode, as a decode step's (graphs guard on it)
        return torch.tensor(values, dtype=torch.long, device=dev)

    ids_t, positions_t, rope_t, slots_t = (long(v + [0] * pad) for v in (flat, positions, rope, slots))
    tables_t = long(tables + [[NULL_PAGE] * width] * pad)
    cache = states[0].kv.cache
    lengths = [len(f) for f in fed]
    split = _split_kernels(model.kernels, dev) and (not runs.compiled or _two_part(runs, lengths))
    if rollback == "auto":
        rollback = "snapshot" if split and len(states) <= SNAPSHOT_MAX_SEQUENCES else "replay"
    most = max(lengths)
    steps = [[b for b, f in enumerate(fed) if len(f) > i] for i in range(most)]  # who steps at position i
    layers: dict[int, _Layer] = {}
    regions = runs.layers
    with torch.inference_mode():
        x = model.embed_tokens(ids_t)
        for blk in model.blocks:
            j = model.slot[blk.index]
            if not blk.is_linear:  # every row attends over its own context: the decode step's region, r rows
                x = regions.attention_decode(blk, x, cache.k[j], cache.v[j], slots_t, tables_t, positions_t, rope_t)
                continue
            mixer = blk.mixer
            mixed, z, beta, g = regions.linear_decode_in(blk, x)
            conv_all, rec_all = batch.conv[j], batch.recurrent[j]
            keep = layers[j] = _Layer()
            if rollback == "replay" and most > 1:
                keep.saved = (None if split else conv_all[:len(states)].clone(), rec_all[:len(states)].clone())
                if not split:
                    keep.mixed, keep.beta, keep.g = mixed, beta, g
            if split:  # every row's conv and step inputs at once, then every position's state update in one call
                if runs.compiled:  # as the compiled steps compute them (_prepared)
                    keep.prepared, keep.histories = _prepared(runs, blk, conv_all, len(states), most, mixed, beta, g)
                else:
                    conv_out, keep.histories = causal_conv1d_update_many(mixed, mixer.conv_weight,
                                                                         list(conv_all[:len(states)]), lengths)
                    keep.prepared = step_inputs(*mixer._split_heads(conv_out), mixer.heads(g), mixer.heads(beta))
                if rollback == "snapshot" and most > 1:
                    keep.after = rec_all.new_empty((keep.prepared.v.shape[0], *rec_all.shape[1:]))
                core = step_states(keep.prepared, rec_all, list(range(len(states))), offsets, lengths, keep.after)
                _conv_states(conv_all, keep.histories, list(range(len(states))), lengths)
                if core.shape[0] < x.shape[0]:
                    core = torch.cat([core, core.new_zeros((x.shape[0] - core.shape[0], *core.shape[1:]))])
            else:
                core = _positions(runs, blk, conv_all, rec_all, steps, offsets, r, len(states), mixed, beta, g,
                                  keep.snaps if rollback == "snapshot" and most > 1 else None)
                if pad:
                    core = torch.cat([core, core.new_zeros((pad, *core.shape[1:]))])
            if runs.compiled:
                core = core.contiguous()
            x = regions.linear_decode_out(blk, x, core, z)
        # compiled: the head's region over the padded rows, as a decode step runs it
        logits, hidden = regions.normed_logits(x) if runs.compiled else model.normed_logits(x[:r])
        logits, hidden = logits[:r], hidden[:r]
    for s, p, f in zip(states, starts, fed):
        s.num_tokens = p + len(f)
        s.token_ids.extend(f)
    return Verified(logits, hidden, offsets, starts, [list(f) for f in fed], layers, rollback, runs)


def accept(engine, batch, done: Verified, consumed: list[int]) -> None:
    """Keep the first consumed[b] fed tokens of each sequence (1 <= consumed[b] <= its fed tokens): roll the
    DeltaNet state of those that keep fewer back to just after them and forget the rest (their KV is overwritten
    later)."""
    states = batch.states
    if len(consumed) != len(done.tokens):
        raise ValueError(f"{len(consumed)} counts for {len(done.tokens)} sequences")
    for c, f in zip(consumed, done.tokens):
        if not 1 <= c <= len(f):
            raise ValueError(f"consumed must be in [1, {len(f)}], got {c}")
    rolled = [b for b, (c, f) in enumerate(zip(consumed, done.tokens)) if c < len(f)]
    if rolled:
        model, runs, dev = engine.model, done.runs, engine.model.device
        index = torch.tensor(rolled, device=dev)
        with torch.inference_mode():
            for blk in model.blocks:
                if not blk.is_linear:
                    continue
                j = model.slot[blk.index]
                keep = done.layers[j]
                conv_all, rec_all = batch.conv[j], batch.recurrent[j]
                if keep.histories is not None:  # the conv state is a slice of the pass's inputs
                    _conv_states(conv_all, keep.histories, rolled, [consumed[b] for b in rolled])
                if done.rollback == "snapshot":
                    for b in rolled:
                        if keep.after is not None:
                            rec_all[b].copy_(keep.after[done.offsets[b] + consumed[b] - 1])
                            continue
                        who, conv, rec = keep.snaps[consumed[b] - 1]
                        at = who.index(b)
                        conv_all[b].copy_(conv[at])
                        rec_all[b].copy_(rec[at])
                    continue
                if keep.saved[0] is not None:
                    conv_all[index] = keep.saved[0][index]
                rec_all[index] = keep.saved[1][index]
                if keep.prepared is not None:  # the accepted positions' state updates, in one call
                    step_states(keep.prepared, rec_all, rolled, [done.offsets[b] for b in rolled],
                                [consumed[b] for b in rolled])
                    continue
                for i in range(max(consumed[b] for b in rolled)):
                    who = [b for b in rolled if consumed[b] > i]
                    rows = _pick_rows([done.offsets[b] + i for b in who])
                    _step(runs, blk, conv_all, rec_all, who, len(states), keep.mixed[rows], keep.beta[rows],
                          keep.g[rows])
    for s, p, c in zip(states, done.starts, consumed):
        s.num_tokens = p + c
        del s.token_ids[p + c:]


def rollback_bytes(done: Verified) -> int:
    """Bytes the pass kept for a rollback (state copies and replay inputs)."""
    total = 0
    for keep in done.layers.values():
        kept = [*(keep.saved or ()), *(t for _, c, r in keep.snaps for t in (c, r)), keep.after]
        kept += [t for t in (keep.mixed, keep.g, keep.beta) if t is not None]
        kept += [*(keep.prepared or ())[:-1], *(keep.histories or ())]
        kept = [t for t in kept if t is not None]
        total += sum(t.numel() * t.element_size() for t in kept)
    return total


_SCORE_ROWS = 64  # rows whose logits a catch-up pass makes at once (Drafter.read_many)


class Drafter:
    """One sequence's drafts: the MTP head's KV and how far the head has read the verified tokens."""

    def __init__(self, head: MTPHead, vocab: int | None, cache: MTPCache):
        """`cache`: the head's KV of the sequence (in its pages: MTPCache), as read so far."""
        self.head = head
        self.cache = cache
        self.vocab = vocab  # tokens the tokenizer has: drafts never pick embedding padding

    def _pick(self, logits: torch.Tensor) -> int:
        return self._picks(logits[None])[0]

    def _picks(self, logits: torch.Tensor) -> list[int]:
        """The greedy draft of each row of logits [N, V]."""
        return (logits if self.vocab is None else logits[:, :self.vocab]).argmax(-1).tolist()

    @staticmethod
    def _read(drafters: list["Drafter"], hidden: list[torch.Tensor], next_tokens: list[list[int]],
              starts: list[int], logit_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One head pass over several sequences' verified pairs (hidden[i]: positions starts[i].., the token after
        each: next_tokens[i]), writing their head KV: MTPHead.forward_many's (normed output, logits of
        logit_rows)."""
        dev = hidden[0].device
        lengths = [len(t) for t in next_tokens]
        positions = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(starts, lengths)])
        tokens = torch.tensor([t for ts in next_tokens for t in ts], device=dev)
        return drafters[0].head.forward_many(torch.cat(hidden), tokens, positions, [d.cache for d in drafters],
                                             lengths, 0, logit_rows)

    def draft(self, hidden: torch.Tensor, next_tokens: list[int], start: int, k: int) -> list[int]:
        """Feed the verified pairs (hidden[i] of position start+i, the token after it) and draft k tokens after
        the last (none for k = 0): greedily, each draft's output hidden chained into the next."""
        dev = hidden.device
        with torch.inference_mode():
            positions = torch.arange(start, start + len(next_tokens), device=dev)
            out, logits = self.head.forward(hidden, torch.tensor(next_tokens, device=dev), positions, self.cache,
                                            logits="last" if k else "none")
            if k < 1:  # only keep up with the verified tokens
                return []
            drafts = [self._pick(logits[-1])]
            h, pos = out[-1:], start + len(next_tokens)
            for step in range(1, k):
                h, logits = self.head.forward(h, torch.tensor(drafts[-1:], device=dev), torch.tensor([pos], device=dev),
                                              self.cache, step, logits="last")
                drafts.append(self._pick(logits[-1]))
                pos += 1
        return drafts

    @classmethod
    def draft_many(cls, drafters: list["Drafter"], hidden: list[torch.Tensor], next_tokens: list[list[int]],
                   starts: list[int], k: int) -> list[list[int]]:
        """`draft` for several sequences at once (one head pass per draft position over all of them: the decode
        service's batch); their drafts, in order."""
        if not drafters:
            return []
        head, dev = drafters[0].head, hidden[0].device
        lengths = [len(t) for t in next_tokens]
        with torch.inference_mode():
            last = list(itertools.accumulate(lengths))
            out, logits = cls._read(drafters, hidden, next_tokens, starts, [i - 1 for i in last] if k else [])
            if k < 1:
                return [[] for _ in drafters]
            drafts = [[d._pick(row)] for d, row in zip(drafters, logits)]
            h = out[[i - 1 for i in last]]
            pos = torch.tensor([s + n for s, n in zip(starts, lengths)], device=dev)
            ones = [1] * len(drafters)
            for step in range(1, k):
                h, logits = head.forward_many(h, torch.tensor([d[-1] for d in drafts], device=dev), pos,
                                              [d.cache for d in drafters], ones, step, list(range(len(drafters))))
                for d, drafter, row in zip(drafts, drafters, logits):
                    d.append(drafter._pick(row))
                pos = pos + 1
        return drafts

    @classmethod
    def read_many(cls, drafters: list["Drafter"], hidden: list[torch.Tensor], next_tokens: list[list[int]],
                  starts: list[int], scored: int = 32) -> tuple[int, int]:
        """The heads read positions they did not draft from (`draft_many`'s input, drafting nothing), in one pass,
        and their first draft at each of the last `scored` of each one's positions with a token after it is
        scored against that token: returns (first drafts that were it, first drafts scored). Logits are made a
        few rows at a time (a real vocabulary's are ~1 MB a row)."""
        if not drafters:
            return 0, 0
        lo = [0, *itertools.accumulate(len(t) for t in next_tokens)]
        rows, came = [], []
        for b, ts in enumerate(next_tokens):
            first = max(0, len(ts) - 1 - scored)
            rows += range(lo[b] + first, lo[b] + len(ts) - 1)
            came += ts[first + 1:]
        picked: list[int] = []
        with torch.inference_mode():
            normed, _ = cls._read(drafters, hidden, next_tokens, starts, [])
            for i in range(0, len(rows), _SCORE_ROWS):  # drafts share the tokenizer's vocabulary
                picked += drafters[0]._picks(drafters[0].head.logits(normed[rows[i:i + _SCORE_ROWS]]))
        return sum(p == c for p, c in zip(picked, came)), len(came)
