"""When a decode step drafts: speculation only where it pays, measured while serving.

A verify pass of K drafts per sequence emits each sequence's accepted drafts and one more token, and costs more
than a plain step: the K extra positions, the head's K draft passes, the rollback. Whether it pays depends on the
head's acceptance on the text being written (a head that drafts poorly never pays), the batch size (a plain step's
cost per token falls with the batch, a verify pass's extra rows do not), the context and the machine. No constant
gets all of these right, so the policy measures them (`SpeculationPolicy`): the seconds of a drafting step and of
a plain step at each batch size, and the head's first-draft acceptance, and drafts when

    (B + D * a) / t_spec(B) >= (1 + margin) * B / t_plain(B)

for B sequences in the step, D of them drafting, a = p1 + p1 q2 + p1 q2 q3 + ... the accepted drafts a pass
expects from the first-draft acceptance p1 and the acceptance q_i of the i-th draft where the ones before it were
accepted (measured by verify passes; p1 where none has reached position i yet). Tokens never depend on it: a
verify pass emits plain decoding's tokens whatever was drafted (engine/speculative.py), so the policy moves speed
only.

While a batch does not draft, the decode runner keeps every position's head input (the final-normed hidden state
and the token after it) and feeds them to the head later, many positions in one pass; such a catch-up pass also
scores the head's first draft at each of those positions against the token that came (`scored`), so the policy
sees the acceptance of text it is not drafting for and starts drafting again when the text gets predictable.
A head whose expected accepted drafts could not pay even for a free verify pass does not draft at all. Each
batch size's step times are measured again when they are `STALE_STEPS` old (one step of the other kind), or
`CLOSE_STALE_STEPS` where the decision was a close call.
The times are of the step and its drafting: the heads' catch-up passes and checkpoint copies are left out (they
come every so many steps whichever kind runs, and would read as one kind's spikes).
`--speculative-policy always` drafts at every step up to `--speculative-max-batch` (the policy's hard limit).
"""

from __future__ import annotations

import collections
import statistics

POLICIES = ("adaptive", "always")
STALE_STEPS = 512  # a batch size's step time this many steps old is measured again
CLOSE_STALE_STEPS = 16  # ... this many, where the last decision was a close call (a slow patch can flip it)
# expected drafting speed / plain speed counted as a close call. Each re-measuring step costs what a verify pass
# costs over a plain step (~35% of a step at batch 1 on small, eager), so a decision 10-20% from paying is
# re-measured after STALE_STEPS, not CLOSE_STALE_STEPS (was (0.8, 1.25); the distilled head of
# bench/spec_decode.py, ~0.8x, served 1,536 tokens at batch 1 with 6 re-measuring steps before, 3 after)
CLOSE = (0.9, 1.1)
MIN_SAMPLES = 3  # step times of a kind measured at a batch size before the policy trusts them
MARGIN = 0.03  # drafting must be expected to pay this much more than plain steps
_DECAY = 0.98  # per observed draft: an acceptance is an average over the last ~50 drafts


class _Rate:
    """A share of drafts accepted, recent ones weighing more; `prior` until one was scored."""

    def __init__(self, prior: float | None = None):
        self.hits, self.trials, self.prior = 0.0, 0.0, prior

    def add(self, hits: int, trials: int) -> None:
        decay = _DECAY ** trials
        self.hits = self.hits * decay + hits
        self.trials = self.trials * decay + trials

    def value(self, default: float) -> float:
        if self.trials > 0:
            return self.hits / self.trials
        return default if self.prior is None else self.prior


class _Seconds:
    """A step kind's seconds at one batch size: the median of its last 3 steps, so one stall (a page fault,
    another process, a first call) does not flip the decision, and a slow patch passes soon."""

    def __init__(self) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=3)
        self.samples = 0
        self.at = 0  # the policy's step count at the latest sample

    @property
    def mean(self) -> float:
        return statistics.median(self.recent)

    def add(self, seconds: float, step: int) -> None:
        self.recent.append(seconds)
        self.samples += 1
        self.at = step


class SpeculationPolicy:
    """Whether the next decode step drafts (module doc). `k` drafts per sequence; steps of more than `max_batch`
    sequences never draft; `mode` one of POLICIES."""

    def __init__(self, k: int, max_batch: int, mode: str = "adaptive"):
        if mode not in POLICIES:
            raise ValueError(f"speculative policy must be one of {POLICIES}, got {mode!r}")
        self.k, self.max_batch, self.mode = k, max_batch, mode
        self.steps = 0
        self._spec: dict[int, _Seconds] = {}
        self._plain: dict[int, _Seconds] = {}
        # the first draft's acceptance, then each later draft's where the ones before it were accepted
        self._rates = [_Rate(prior=0.5)] + [_Rate() for _ in range(max(0, k - 1))]

    def allowed(self, batch: int) -> bool:
        """Whether a step of `batch` sequences may draft at all (or carry a resumed stream's replayed tokens)."""
        return self.k > 0 and batch <= self.max_batch

    @property
    def acceptance(self) -> float:
        """The head's recent first-draft acceptance (the share of first drafts that were the chosen token)."""
        return self._rates[0].value(0.0)

    def expected_accepted(self) -> float:
        """Accepted drafts a sequence's verify pass is expected to emit: p1 + p1 q2 + p1 q2 q3 + ..."""
        p1 = self.acceptance
        total, reach = 0.0, 1.0
        for rate in self._rates:
            reach *= rate.value(p1)
            total += reach
        return total

    def drafts(self, batch: int, drafting: int) -> bool:
        """Whether a step of `batch` sequences, `drafting` of which have a head, should draft."""
        if drafting < 1 or not self.allowed(batch):
            return False
        if self.mode == "always":
            return True
        tokens = batch + drafting * self.expected_accepted()  # a drafting step's expected tokens
        if tokens < (1 + MARGIN) * batch:
            return False  # would not pay even if drafting cost nothing (drafts scored while plain bring it back)
        spec, plain = self._spec.get(batch), self._plain.get(batch)
        if spec is None or spec.samples < MIN_SAMPLES:
            return True  # not measured yet: try it
        if plain is None or plain.samples < MIN_SAMPLES:
            return False
        speedup = tokens / spec.mean * plain.mean / batch
        pays = speedup >= 1 + MARGIN
        close = CLOSE[0] <= speedup <= CLOSE[1]
        stale = (plain if pays else spec).at + (CLOSE_STALE_STEPS if close else STALE_STEPS) <= self.steps
        return pays != stale  # now and then one step of the other kind, to measure it again

    def timed(self, batch: int, drafted: bool, seconds: float) -> None:
        """A step of `batch` sequences took `seconds` (its drafting included); it drafted or not."""
        self.steps += 1
        (self._spec if drafted else self._plain).setdefault(batch, _Seconds()).add(seconds, self.steps)

    def scored(self, accepted: int, drafted: int) -> None:
        """`drafted` first drafts were scored against the chosen tokens, `accepted` of them were them (a catch-up
        pass's shadow drafts)."""
        self._rates[0].add(accepted, drafted)

    def verified(self, accepted_at: list[int], drafting: int) -> None:
        """A verify pass: `drafting` sequences fed drafts, accepted_at[i] of them had their (i+1)-th accepted."""
        reached = [drafting, *accepted_at[:-1]]
        for rate, hits, trials in zip(self._rates, accepted_at, reached):
            if trials:
                rate.add(hits, trials)
