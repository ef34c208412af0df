"""The decode stepping loop: ONE thread steps every active sequence together (continuous batching).

Between steps it applies the scheduler's round (cancelled sequences leave and free their slot, waiting ones
join), then one `DecodeBatch.step` feeds each sequence its last sampled token, samples the next token per
sequence, and hands the outputs of the whole step to `deliver` at once (the service forwards them to the
event loop with one thread-safe call). torch releases the GIL during the step, so the event loop streams the
previous step's tokens while this one computes. No gRPC here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.engine import DecodeBatch, Engine
from engine.generate import FINISH_LENGTH, OutputTracker
from engine.sampling import Sampler, greedy_batch
from engine.state import HybridState
from decode_service.scheduler import LoadInfo, Scheduler
from qwenpd.grpc_common import QwenpdError, Unavailable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Output:
    """Tokens one sequence produced since its last output; `finish_reason` / `error` only on its last."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None = None
    error: QwenpdError | None = None


@dataclass(eq=False, slots=True)
class Sequence:
    """One sequence in (or waiting for) the batch. `next_token` is the sampled token the next step consumes."""

    request_id: str
    state: HybridState
    sampler: Sampler
    tracker: OutputTracker
    next_token: int
    max_context: int
    sink: Any = None  # the service's per-request receiver of outputs; opaque here
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = field(default=None)

    def push(self, token_id: int, logprob: float) -> Output:
        """Record a sampled token; the output to stream, with the finish reason when the sequence ends."""
        text = self.tracker.push(token_id, logprob)
        self.next_token = token_id
        reason = self.tracker.finish_reason
        if reason is None and self.state.num_tokens >= self.max_context:  # no room to consume this token
            reason = FINISH_LENGTH
            text += self.tracker._flush()  # noqa: SLF001 - release held-back text as the sequence ends
        self.finish_reason = reason
        return Output([token_id], [logprob], text, reason)


Deliver = Callable[[list[tuple[Sequence, Output]]], None]


class DecodeRunner:
    """Owns the DecodeBatch and the stepping thread. `submit`/`cancel`/`load` may be called from any thread."""

    def __init__(self, engine: Engine, max_batch: int, max_queued: int, deliver: Deliver):
        self.engine = engine
        self.batch = DecodeBatch(engine, max_batch)
        self.scheduler: Scheduler[Sequence] = Scheduler(max_batch, max_queued)
        self._deliver = deliver
        self._members: dict[int, Sequence] = {}  # id(state) -> sequence, for sequences in the batch
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self.steps = 0
        self.tokens = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        left = self.scheduler.close()
        self._thread.join(timeout)
        if left:
            err = Unavailable("decode service is shutting down", subject="decode_batch")
            self._deliver([(s, Output([], [], "", error=err)) for s in left])

    def check_room(self) -> None:
        self.scheduler.check_room()

    def submit(self, seq: Sequence) -> None:
        self.scheduler.submit(seq)

    def cancel(self, seq: Sequence) -> None:
        self.scheduler.cancel(seq)

    def load(self) -> LoadInfo:
        return self.scheduler.load()

    # ---- the stepping thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            rnd = self.scheduler.next_round(idle=not self.batch.states, timeout=1.0)
            if rnd is None:
                return
            for seq in rnd.leave:
                self._leave(seq)
            for seq in rnd.join:
                self.batch.add(seq.state)
                self._members[id(seq.state)] = seq
            if not self.batch.states:
                continue
            try:
                outputs = self._step()
            except Exception as exc:  # noqa: BLE001 - the sequences of this step fail, the loop lives on
                log.exception("decode step failed")
                err = exc if isinstance(exc, QwenpdError) else QwenpdError(f"decode step failed: {exc}")
                outputs = [(seq, Output([], [], "", error=err)) for seq in self._members.values()]
                for seq, _ in outputs:
                    self._leave(seq)
            self._deliver(outputs)

    def _leave(self, seq: Sequence) -> None:
        """Take `seq` out of the batch (its slot is free from now on) and out of the scheduler."""
        if self._members.pop(id(seq.state), None) is not None:
            self.batch.remove(seq.state)
        self.scheduler.finish(seq)

    def _step(self) -> list[tuple[Sequence, Output]]:
        seqs = [self._members[id(s)] for s in self.batch.states]  # row order
        logits = self.batch.step([seq.next_token for seq in seqs])  # [B, V] fp32
        greedy = [seq.sampler.params.greedy for seq in seqs]
        ids, logprobs = greedy_batch(logits) if any(greedy) else ([], [])
        outputs = []
        for row, seq in enumerate(seqs):
            token, logprob = (ids[row], logprobs[row]) if greedy[row] else seq.sampler.sample(logits[row])
            outputs.append((seq, seq.push(token, logprob)))
        self.steps += 1
        self.tokens += len(seqs)
        for seq, out in outputs:
            if out.finish_reason is not None:
                self._leave(seq)
        return outputs
