"""The decode stepping loop: ONE thread owns the model and steps every active sequence together.

All tensor work of the decode service happens on this thread — loading the engine, the warm-up, copying a
joining sequence's state out of shared memory into its batch slot, and every step — because torch's OpenMP
runtime keeps one thread team per calling thread and several teams on the same cores slow each other down.

Between steps the loop applies the scheduler's round (cancelled sequences leave and free their slot, waiting
ones are loaded and join), then one `DecodeBatch.step` feeds each sequence its last sampled token, samples the
next token per sequence, and hands the outputs of the whole step to `deliver` at once (the service forwards them
to the event loop with one thread-safe call). No gRPC here.

Crash resume is exact because a resumed sequence is replayed here, not recomputed by prefill: it joins with the
state the failed decode had at some point (its hand-off checkpoint or a decode-side checkpoint) and the tokens
already streamed after that point (`replay`), and each step feeds it the next of them instead of sampling, as
one row of the batch, through the same kernels as a live step (with speculation on, up to K+1 of them a verify
pass, each position a decode step's bits). The decode step is batch invariant (engine/
runner.py decode_row_multiple, engine/linear.py, kernels/paged_attention), so the logits after the last replayed
token are the bits the failed decode computed, and the sampler (advanced by the draws already made) picks the
token it would have picked. With `checkpoint_every`, a sequence's state is copied out every that many tokens for
the service to store, so a resume replays at most that many steps.

With speculation on, decode_service/policy.py decides before each step whether the batch drafts; a step that
does not is a plain step whose final-normed hidden states the MTP heads read later, many positions in one pass
(`_plan`, `_catch_up`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenpd.decode_service.policy import SpeculationPolicy
from qwenpd.decode_service.scheduler import LoadInfo, Scheduler
from qwenpd.engine.pages import PageBudget, pages_for
from qwenpd.engine.engine import DecodeBatch, Engine
from qwenpd.engine.output import FINISH_LENGTH, OutputTracker
from qwenpd.engine import state_spec
from qwenpd.engine.mtp import MTPCache
from qwenpd.engine.constraint import ConstraintError
from qwenpd.engine.sampling import Sampler, greedy_batch
from qwenpd.engine.speculative import Drafter
from qwenpd.engine.state import HybridState
from qwenpd.errors import InvalidArgument, QwenpdError, Unavailable
from qwenpd.handoff import STREAM_TAIL, StreamRecord

log = logging.getLogger(__name__)
# unread positions after which a head that is not drafting reads them (policy.py): in a batch that may draft,
# soon, so the policy sees the acceptance of what it is not drafting for; in one too large to draft, late (a
# sequence that finishes first never pays for them; [CATCH_UP_LATE, H] hidden states kept per sequence at most)
CATCH_UP, CATCH_UP_LATE = 32, 512
FINISH_ERROR = "error"  # DecodeSequence.finish_reason of one that failed alone (its Output carries the error)


@dataclass(slots=True)
class Output:
    """Tokens one sequence produced since its last output; `finish_reason` / `error` only on its last."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None = None
    error: QwenpdError | None = None
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, with top_logprobs
    # a decode-side checkpoint to store: the state after `record.num_tokens` tokens (host copies), or, once
    # stored, the resume point to announce
    checkpoint: dict[str, torch.Tensor] | None = None
    record: StreamRecord | None = None
    resume: tuple[str, int] | None = None  # (checkpoint id, tokens it has consumed)


class ReadGuard:
    """Who may still read a sequence's leased checkpoint bytes, and who releases them (exactly once).

    The stepping thread `claim`s the bytes before copying them and calls `done` after; the request handler calls
    `abandon` when it leaves. Whichever comes last releases: bytes are never released while being read."""

    def __init__(self, release: Callable[[], None]):
        self._release = release
        self._lock = threading.Lock()
        self._state = "held"  # held -> reading -> released, or held -> released

    def claim(self) -> bool:
        with self._lock:
            if self._state != "held":
                return False
            self._state = "reading"
            return True

    def done(self) -> None:
        with self._lock:
            self._state = "released"
        self._release()

    def abandon(self) -> None:
        with self._lock:
            if self._state != "held":
                return  # released already, or the reader releases when done
            self._state = "released"
        self._release()


@dataclass(eq=False, slots=True)
class DecodeSequence:
    """One sequence in (or waiting for) the batch. `next_token` is the sampled token its next step consumes;
    `num_tokens` the tokens its state has consumed. `load` builds the state from the leased bytes (run on the
    stepping thread when the sequence joins); `guard` guards those bytes."""

    request_id: str
    load: Callable[[], HybridState]
    guard: ReadGuard
    sampler: Sampler
    tracker: OutputTracker
    next_token: int
    num_tokens: int
    max_context: int
    sink: Any = None  # the service's per-request receiver of outputs; opaque here
    kv_tokens: int = 0  # the most tokens its KV can ever hold (pages promised at admission)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    image_tokens: int = 0
    state: HybridState | None = None
    finish_reason: str | None = field(default=None)
    submitted_at: float = 0.0  # time.monotonic() when it started waiting for a slot
    replay: collections.deque[int] = field(default_factory=collections.deque)  # resumed: fed after next_token
    stream: StreamRecord | None = None  # whose state this is (stored with its checkpoints)
    tail: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=STREAM_TAIL))
    checkpointed_at: int = 0  # num_tokens of its latest resume point
    resume_id: str = ""  # the checkpoint it can be resumed from (the service's bookkeeping)
    writing: bool = False  # a checkpoint of it is being stored
    ended: bool = False  # its request left: nothing more to store
    pin: Any = None  # the service's signal to end its resume point's lease; opaque here
    draft: dict[str, torch.Tensor] | None = None  # speculative: the hand-off's draft state (leased views), until it joins
    drafter: Drafter | None = None  # speculative: its MTP head's KV, once joined
    drafts: list[int] = field(default_factory=list)  # speculative: the drafts after next_token
    # speculative: the final-normed hidden state at num_tokens - 1, which the head paired with next_token (a
    # decode-side checkpoint carries it with the head's KV, so a resumed stream drafts again)
    draft_hidden: torch.Tensor | None = None
    # speculative: what the head has not read yet (it reads late while the batch does not draft: policy.py), the
    # hidden states of positions unread_from.. and the token after each
    unread_from: int = 0
    unread_hidden: list[torch.Tensor] = field(default_factory=list)
    unread_tokens: list[int] = field(default_factory=list)

    def unread(self, start: int, hidden: torch.Tensor, tokens: list[int]) -> None:
        """The head's input at positions start.. (hidden [n, H], the token after each), for it to read later."""
        if not self.unread_tokens:
            self.unread_from = start
        self.unread_hidden.append(hidden)
        self.unread_tokens += tokens
        self.draft_hidden = hidden[-1]

    def take_unread(self, keep_last: bool = False) -> tuple[torch.Tensor, list[int], int]:
        """The unread input (hidden [n, H], tokens, first position), the last position's left unread with
        `keep_last` (a checkpoint's draft state ends before it: state_spec.draft_shapes)."""
        hidden, tokens, start = torch.cat(self.unread_hidden), self.unread_tokens, self.unread_from
        self.unread_hidden, self.unread_tokens = [], []
        if keep_last:
            self.unread(start + len(tokens) - 1, hidden[-1:], tokens[-1:])
            hidden, tokens = hidden[:-1], tokens[:-1]
        return hidden, tokens, start

    def push(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None = None) -> Output:
        """Record a sampled token; the output to stream, with the finish reason when the sequence ends."""
        text = self.tracker.push(token_id, logprob)
        self.next_token = token_id
        reason = self.tracker.finish_reason
        if reason is None and self.num_tokens >= self.max_context:  # no room left to consume this token
            reason = FINISH_LENGTH
            text += self.tracker.finish(reason)
        self.finish_reason = reason
        return Output([token_id], [logprob], text, reason, top=[top] if top is not None else [])


Deliver = Callable[[list[tuple[DecodeSequence, Output]]], None]


class DecodeRunner:
    """Owns the engine, the DecodeBatch and the stepping thread. `submit`/`cancel`/`load_info` may be called
    from any thread; `start` returns the engine once it is loaded (and warmed up: Engine.warm_up) on the stepping
    thread."""

    def __init__(self, make_engine: Callable[[], Engine], max_batch: int, max_queued: int, deliver: Deliver,
                 checkpoint_every: int = 0, num_speculative_tokens: int = 0, speculative_max_batch: int = 2,
                 speculative_policy: "str | SpeculationPolicy" = "adaptive"):
        self.scheduler: Scheduler[DecodeSequence] = Scheduler(max_batch, max_queued)
        self.max_batch = max_batch
        self.checkpoint_every = checkpoint_every  # tokens between decode-side checkpoints (0 = none)
        self.k = num_speculative_tokens
        # a policy object carries what it measured over from another runner (bench/spec_decode.py: a warm server)
        self.policy = speculative_policy if isinstance(speculative_policy, SpeculationPolicy) else \
            SpeculationPolicy(num_speculative_tokens, speculative_max_batch, speculative_policy)
        # metrics: per verify pass, the sequences that fed drafts, the drafts fed, and how many were accepted at
        # each draft position (1st, 2nd, ...)
        self.on_verify: Callable[[int, int, list[int]], None] = lambda seqs, drafted, accepted_at: None
        self.on_plain_step: Callable[[], None] = lambda: None  # metrics: a step with heads that drafted nothing
        self._untimed = 0.0  # seconds of this step the policy does not count (catch-ups, checkpoint copies)
        self.engine: Engine | None = None
        self.batch: DecodeBatch | None = None
        self.steps = 0
        self.tokens = 0
        self.replayed = 0  # tokens fed again for resumed sequences
        self.on_replay: Callable[[int], None] = lambda n: None  # metrics: tokens replayed in a step
        self.on_checkpoint_copy: Callable[[float], None] = lambda s: None  # metrics: seconds a state copy took
        self._make_engine = make_engine
        self._deliver = deliver
        self._members: dict[int, DecodeSequence] = {}  # id(state) -> sequence, for sequences in the batch
        self._broken: QwenpdError | None = None  # why the batch cannot be used any more (a slot could not be freed)
        self.on_join: Callable[[float], None] = lambda waited_s: None  # metrics: slot wait of a joining sequence
        self.on_step: Callable[[int], None] = lambda batch_size: None  # metrics: sequences in each step
        self._ready: concurrent.futures.Future[Engine] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, name="decode-loop", daemon=True)

    def start(self) -> Engine:
        """Start the stepping thread; wait for the engine (raises what loading raised)."""
        self._thread.start()
        return self._ready.result()

    def stop(self, timeout: float = 5.0) -> None:
        left = self.scheduler.close()
        self._thread.join(timeout)
        err = Unavailable("decode service is shutting down", subject="decode_batch")
        for seq in left:
            seq.guard.abandon()
        if left:
            self._deliver([(s, Output([], [], "", error=err)) for s in left])

    def pages_of(self, seq: DecodeSequence) -> int:
        """KV pages `seq` may need (promised at admission, so it never runs out mid-generation)."""
        assert self.engine is not None
        return pages_for(seq.kv_tokens, self.engine.kv_cache.page_size)

    def submit(self, seq: DecodeSequence) -> None:
        seq.submitted_at = time.monotonic()
        self.scheduler.submit(seq, self.pages_of(seq))

    def cancel(self, seq: DecodeSequence) -> None:
        self.scheduler.cancel(seq)

    def load_info(self) -> LoadInfo:
        return self.scheduler.load()

    # ---- the stepping thread ---------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            engine = self._make_engine()
            self.batch = DecodeBatch(engine, self.max_batch)
            cache = engine.kv_cache
            self.scheduler.pages = PageBudget(None if cache.growable else cache.allocator.usable)
            self.engine = engine
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._ready.set_exception(exc)
            return
        self._ready.set_result(engine)
        self._run()

    def _run(self) -> None:
        assert self.batch is not None
        while True:
            rnd = self.scheduler.next_round(idle=not self._members, timeout=1.0)
            if rnd is None:
                return
            for seq in rnd.leave:
                self._leave(seq)
            outputs = [out for seq in rnd.join if (out := self._join(seq)) is not None]
            if self._members:
                try:
                    outputs += self._step()
                except Exception as exc:  # noqa: BLE001 - the sequences of this step fail, the loop lives on
                    log.exception("decode step failed")
                    err = exc if isinstance(exc, QwenpdError) else QwenpdError(f"decode step failed: {exc}")
                    failed = list(self._members.values())
                    for seq in failed:
                        self._leave(seq)
                    outputs += [(seq, Output([], [], "", error=err)) for seq in failed]
            if outputs:
                self._deliver(outputs)

    def _join(self, seq: DecodeSequence) -> tuple[DecodeSequence, Output] | None:
        """Copy the sequence's state into a batch slot; an error output if that failed."""
        assert self.batch is not None
        if not seq.guard.claim():  # its request left while it waited: nothing to load
            self.scheduler.finish(seq)
            return None
        try:
            if self._broken is not None:
                self.scheduler.finish(seq)
                return seq, Output([], [], "", error=self._broken)
            seq.state = seq.load()
            self.batch.add(seq.state)
            if seq.draft is not None:
                seq.drafter = self._drafter(seq)
        except Exception as exc:  # noqa: BLE001
            log.exception("loading sequence %s failed", seq.request_id)
            if seq.state is not None:
                self._free(seq)
            self.scheduler.finish(seq)
            err = exc if isinstance(exc, QwenpdError) else QwenpdError(f"loading the checkpoint failed: {exc}")
            return seq, Output([], [], "", error=err)
        finally:
            seq.load = _loaded  # drop the references to the leased bytes before they are released
            seq.draft = None
            seq.guard.done()
        self._members[id(seq.state)] = seq
        self.on_join(time.monotonic() - seq.submitted_at)
        return None

    def _drafter(self, seq: DecodeSequence) -> Drafter:
        """The sequence's Drafter with the hand-off's head KV copied in; the hand-off's hidden state at the last
        position, paired with next_token, is the head's first unread input."""
        assert self.engine is not None and self.engine.draft_head is not None and seq.draft is not None
        head, n = self.engine.draft_head, seq.num_tokens
        drafter = Drafter(head, seq.sampler.vocab, MTPCache(seq.state.kv))  # in the sequence's pages
        drafter.cache.load(seq.draft, n - 1)
        # a copy: the hand-off's bytes are leased until the join ends, and the head may read this much later
        seq.unread(n - 1, seq.draft[state_spec.DRAFT_HIDDEN].to(head.model.device, copy=True)[None],
                   [seq.next_token])
        return drafter

    def _leave(self, seq: DecodeSequence) -> None:
        """Take `seq` out of the batch (its slot is free from now on) and out of the scheduler."""
        if seq.state is not None and self._members.pop(id(seq.state), None) is not None:
            self._free(seq)
        self.scheduler.finish(seq)

    def _free(self, seq: DecodeSequence) -> None:
        """Take seq.state out of the batch if it is there and free its KV pages. Where that fails (a lost
        tensor-parallel rank breaks every engine call) it is logged and the batch is broken from then on: every
        later sequence fails at once with the reason (UNAVAILABLE: it resumes on another instance), and the loop,
        and the streams of this step, go on (their outputs or errors are delivered now)."""
        assert self.batch is not None and seq.state is not None
        try:
            if any(s is seq.state for s in self.batch.states):
                self.batch.remove(seq.state)
            seq.state.release()  # its KV pages are free from now on
        except Exception as exc:  # noqa: BLE001
            log.warning("freeing the slot of %s failed: %s", seq.request_id, exc)
            if self._broken is None:
                self._broken = exc if isinstance(exc, Unavailable) else Unavailable(
                    f"the decode batch is unusable (freeing a slot failed: {exc})")

    def _step(self) -> list[tuple[DecodeSequence, Output]]:
        assert self.batch is not None
        seqs = [self._members[id(s)] for s in self.batch.states]  # row order
        self.on_step(len(seqs))
        heads = [seq for seq in seqs if seq.drafter is not None]
        if not heads:
            return self._plain_step(seqs, False)
        started, self._untimed = time.perf_counter(), 0.0
        drafting = self._plan(seqs, heads)
        replaying = any(seq.replay for seq in seqs)
        if drafting or (replaying and self.policy.allowed(len(seqs))):
            outputs = self._verify_step(seqs)
        else:
            outputs = self._plain_step(seqs, True)
            self.on_plain_step()
        if not replaying:
            self.policy.timed(len(seqs), drafting, time.perf_counter() - started - self._untimed)
        return outputs

    def _plan(self, seqs: list[DecodeSequence], heads: list[DecodeSequence]) -> bool:
        """Before a step: where the policy has the batch draft, the heads read their unread input and draft what
        comes after next_token (one head pass per draft position over them all); elsewhere they only catch up once
        CATCH_UP (CATCH_UP_LATE in a batch too large to draft) positions are unread, scoring their would-be drafts
        (policy.py). Whether the step drafts."""
        ready = [seq for seq in heads if not seq.replay]  # a sequence still replaying feeds no drafts: they ride
        drafting = self.policy.drafts(len(seqs), len(ready))
        for seq in heads:
            seq.drafts = []
        if drafting:
            # what piled up while not drafting is read apart (a catch-up, untimed), so every drafting step the
            # policy times reads only the last pass's positions
            self._catch_up([seq for seq in ready if len(seq.unread_tokens) > self.k + 1], keep_last=True)
            drafts = Drafter.draft_many(*_take_unread(ready), self.k)
            for seq, d in zip(ready, drafts):
                seq.drafts = d
        most = CATCH_UP if self.policy.allowed(len(seqs)) else CATCH_UP_LATE
        self._catch_up([seq for seq in heads if len(seq.unread_tokens) >= most])
        return drafting and any(seq.drafts for seq in ready)

    def _catch_up(self, seqs: list[DecodeSequence], keep_last: bool = False) -> None:
        """The heads of `seqs` read their unread input (but the last position's with `keep_last`), in one pass;
        their first drafts at those positions are scored for the policy."""
        group = [seq for seq in seqs if len(seq.unread_tokens) > keep_last]
        if group:
            started = time.perf_counter()
            hits, scored = Drafter.read_many(*_take_unread(group, keep_last))
            self.policy.scored(hits, scored)
            self._untimed += time.perf_counter() - started  # not a step's own cost (policy.py)

    def _plain_step(self, seqs: list[DecodeSequence], heads: bool) -> list[tuple[DecodeSequence, Output]]:
        """One token for every sequence; with `heads`, the heads' input is kept for them to read later."""
        assert self.batch is not None
        fed = [seq.next_token for seq in seqs]
        starts = [seq.num_tokens for seq in seqs]
        logits, hidden = self.batch.step(fed, normed=True) if heads else (self.batch.step(fed), None)
        greedy = [seq.sampler.params.plain_greedy and not seq.replay for seq in seqs]
        words = None if self.engine is None or self.engine.grammars is None else self.engine.grammars.words
        ids, logprobs = greedy_batch(logits, words) if any(greedy) else ([], [])
        outputs = []
        replayed = 0
        for row, seq in enumerate(seqs):
            seq.num_tokens += 1
            seq.tail.append(fed[row])
            if seq.replay:  # already streamed before a failure: feed it, sample nothing
                seq.next_token = seq.replay.popleft()
                replayed += 1
                continue
            try:
                token, logprob = (ids[row], logprobs[row]) if greedy[row] else seq.sampler.sample(logits[row])
                top = seq.sampler.last_top if seq.sampler.params.top_logprobs else None
                out = seq.push(token, logprob, top)
            except Exception as exc:  # noqa: BLE001 - this sequence fails, the batch goes on
                out = _failed(seq, exc, Output([], [], ""))
            outputs.append((seq, out))
        for row, seq in enumerate(seqs):
            if hidden is not None and seq.drafter is not None and seq.finish_reason is None:
                seq.unread(starts[row], hidden[row:row + 1], [seq.next_token])
        for seq, out in outputs:
            self._maybe_checkpoint(seq, out)
        self.steps += 1
        self.tokens += len(seqs) - replayed
        if replayed:
            self.replayed += replayed
            self.on_replay(replayed)
        for seq, out in outputs:
            if seq.finish_reason is not None:
                self._leave(seq)
        return outputs

    def _verify_step(self, seqs: list[DecodeSequence]) -> list[tuple[DecodeSequence, Output]]:
        """One verify pass over the batch (module doc): drafts where they pay, one token elsewhere. A resumed
        sequence still replaying feeds up to K of its replayed tokens after next_token (in a batch that drafts),
        all of them kept: K+1 replayed positions a pass, each the bits of a decode step (engine/speculative.py),
        at least one left to become next_token (its logits choose the first new token)."""
        assert self.batch is not None and self.engine is not None
        riding = self.policy.allowed(len(seqs))
        fed = []
        for seq in seqs:
            drafts: list[int] = []
            if seq.replay:  # only where drafts may ride too: a pass with several positions copies every state
                drafts = [seq.replay[i] for i in range(min(self.k, len(seq.replay) - 1))] if riding else []
            elif seq.drafts:
                room = min(seq.max_context - seq.num_tokens - 1,  # context left after next_token
                           seq.sampler.params.max_tokens - len(seq.tracker.token_ids) - 1)  # tokens left after it
                drafts = seq.drafts[:max(0, room)]
            fed.append([seq.next_token, *drafts])
        done = self.batch.verify(fed)
        greedy = [seq.sampler.params.plain_greedy and not seq.replay for seq in seqs]
        words = None if self.engine.grammars is None else self.engine.grammars.words
        # plain greedy rows as the plain step picks them: one argmax over every row of the pass
        ids, logprobs = greedy_batch(done.logits, words) if any(greedy) else ([], [])
        consumed, outputs, replayed = [], [], 0
        drafted, drafting_seqs, accepted_at = 0, 0, [0] * self.k
        for b, seq in enumerate(seqs):
            start, rows, drafts = seq.num_tokens, done.rows(b), fed[b][1:]
            if seq.replay:  # already streamed before a failure: feed them, sample nothing
                seq.num_tokens += len(fed[b])
                seq.tail.extend(fed[b])
                for _ in fed[b]:
                    seq.next_token = seq.replay.popleft()
                replayed += len(fed[b])
                consumed.append(len(fed[b]))
                continue
            drafted += len(drafts)
            drafting_seqs += bool(drafts)
            out = Output([], [], "")
            logits = done.logits[rows]
            for i in range(len(fed[b])):  # as plain decoding would choose, position by position
                seq.num_tokens = start + i + 1
                seq.tail.append(fed[b][i])
                row = done.offsets[b] + i
                try:
                    token, logprob = (ids[row], logprobs[row]) if greedy[b] else seq.sampler.sample(logits[i])
                    top = seq.sampler.last_top if seq.sampler.params.top_logprobs else None
                    step_out = seq.push(token, logprob, top)
                except Exception as exc:  # noqa: BLE001 - this sequence fails (with what it made before), the batch goes on
                    _failed(seq, exc, out)
                    break
                out.token_ids += step_out.token_ids
                out.logprobs += step_out.logprobs
                out.text += step_out.text
                out.top += step_out.top
                out.finish_reason = step_out.finish_reason
                if seq.finish_reason is not None or i == len(drafts) or token != drafts[i]:
                    break
                accepted_at[i] += 1
            consumed.append(seq.num_tokens - start)
            outputs.append((seq, out))
        self.batch.accept(consumed)
        for b, seq in enumerate(seqs):  # the heads' input at the verified positions, read at the next _plan
            if seq.drafter is not None and seq.finish_reason is None:
                seq.unread(done.starts[b], done.hidden[done.rows(b)][:consumed[b]],
                           [*done.tokens[b][1:consumed[b]], seq.next_token])
        for seq, out in outputs:
            self._maybe_checkpoint(seq, out)
        self.steps += 1
        self.tokens += sum(len(out.token_ids) for _, out in outputs)
        if replayed:
            self.replayed += replayed
            self.on_replay(replayed)
        if drafted:
            self.policy.verified(accepted_at, drafting_seqs)
            self.on_verify(drafting_seqs, drafted, accepted_at)
        for seq, out in outputs:
            if seq.finish_reason is not None:
                self._leave(seq)
        return outputs

    def _maybe_checkpoint(self, seq: DecodeSequence, out: Output) -> None:
        """Attach a copy of `seq`'s state to `out` for the service to store, when one is due."""
        if out.error is None and self._checkpoint_due(seq, out):
            copy_started, untimed = time.perf_counter(), self._untimed
            out.checkpoint = seq.state.to_tensors()
            if seq.drafter is not None and seq.draft_hidden is not None:  # the draft state, as a hand-off's
                self._catch_up([seq], keep_last=True)
                out.checkpoint.update(seq.drafter.cache.draft_state(0, seq.num_tokens, seq.draft_hidden))
            self.on_checkpoint_copy(time.perf_counter() - copy_started)
            self._untimed = untimed + time.perf_counter() - copy_started  # its catch-up counted once
            out.record = seq.stream.advanced(seq.num_tokens, seq.tail)
            seq.checkpointed_at = seq.num_tokens

    def _checkpoint_due(self, seq: DecodeSequence, out: Output) -> bool:
        """Whether to copy out `seq`'s state now: every checkpoint_every tokens while it goes on; one due while the
        last copy is still being stored is taken at the first step after that store ends (so a resume replays at
        most checkpoint_every tokens and what streamed during one store, on a loaded host too)."""
        if not self.checkpoint_every or out.finish_reason is not None or seq.stream is None or seq.state is None:
            return False
        return seq.num_tokens - seq.checkpointed_at >= self.checkpoint_every and not seq.writing


def _failed(seq: DecodeSequence, exc: Exception, out: Output) -> Output:
    """`seq` could not sample or record its token (its grammar cannot go on: INVALID_ARGUMENT naming
    structured_output; anything else: INTERNAL): `out` (what it made before, this step) ends with the error and
    the sequence leaves the batch; the other sequences of the step are not touched."""
    if isinstance(exc, ConstraintError):
        out.error = InvalidArgument("sampling.structured_output", str(exc))
    else:
        log.exception("sampling for %s failed", seq.request_id)
        out.error = exc if isinstance(exc, QwenpdError) else QwenpdError(f"sampling failed: {exc}")
    seq.finish_reason = FINISH_ERROR
    return out


def _take_unread(seqs: list[DecodeSequence], keep_last: bool = False) -> tuple[list, list, list, list]:
    """What the heads of `seqs` have not read (DecodeSequence.take_unread), as Drafter.draft_many / read_many take
    it: (drafters, hidden states, tokens, first positions)."""
    taken = [seq.take_unread(keep_last) for seq in seqs]
    return ([seq.drafter for seq in seqs], [h for h, _, _ in taken], [t for _, t, _ in taken],
            [p for _, _, p in taken])


def _loaded() -> HybridState:
    raise RuntimeError("sequence state was already loaded")
