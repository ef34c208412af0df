"""Per-request sampling: greedy, temperature, top-k, min-p, top-p, logit bias, reproducible per-request seeds, stop
conditions."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwenpd.engine.constraint import ConstraintError, Grammars, Constraint

MAX_TOP_LOGPROBS = 20  # as OpenAI


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Options of one request. temperature 0 = greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off (drop tokens
    less likely than min_p times the most likely one); logit_bias: (token id, added logit) pairs, applied before
    everything else, greedy included; seed None = random."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # no EOS or stop id before this many tokens (unless ignore_eos, EOS ends nothing anyway)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # times how often it was generated
    top_logprobs: int = 0  # report this many most likely tokens at each position (Sampler.last_top)
    structured_output: str = ""  # a grammar the output must follow (engine/constraint.py); "" = none
    repetition_penalty: float = 1.0  # vLLM's/transformers': tokens of the prompt or output so far, logit/p if > 0
    token_bytes: bool = False  # report each token's own bytes (a reporting option: sampling does not read it)
    speculative: bool | None = None  # MTP drafts where the service runs them (None = the service's default: on)

    def __post_init__(self) -> None:
        # each error names the field, so services can turn it into a field violation
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not math.isfinite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(t < 0 or not math.isfinite(b) or not -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise ValueError("logit_bias maps token ids >= 0 to biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the logits as they are: what a batch argmax (greedy_batch) can serve."""
        return self.greedy and not (self.logit_bias or self.min_tokens or self.history or self.top_logprobs)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def history(self) -> bool:
        """Whether sampling depends on the tokens generated so far (penalties count them, a grammar's state
        follows them): they cross hand-off and resume."""
        return self.penalized or bool(self.structured_output)


@dataclass(slots=True)
class Sampler:
    """Samples the tokens of one sequence; its generator makes a seeded request reproducible.

    The math runs where the logits are (any device); the generator is a host one drawing one uniform per token,
    so a seeded request gives the same tokens on every device.

    The generator is advanced exactly once per sampled token, so a request resumed after `n` tokens can be
    reproduced by `Sampler.resumed(params, n)`.
    """

    params: SamplingParams
    ending_ids: frozenset[int] = frozenset()  # ids that end a sequence (EOS, stop ids): held back by min_tokens
    generator: torch.Generator = field(init=False)
    draws: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # tokens generated so far (penalties)
    last_top: list[tuple[int, float]] = field(default_factory=list)  # the last position's candidates
    constraint: Constraint | None = None  # the grammar's state (params.structured_output)
    vocab: int | None = None  # tokens the tokenizer has: rows past it (embedding padding) are never sampled
    prompt_seen: frozenset[int] = frozenset()  # repetition_penalty: the prompt's distinct ids

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed)

    @classmethod
    def resumed(cls, params: SamplingParams, draws: int, ending_ids: frozenset[int] = frozenset(),
                generated: Sequence[int] = (), grammars: Grammars | None = None,
                prompt: Sequence[int] = ()) -> "Sampler":
        """The sampler of a sequence that has made `draws` tokens already, `generated` among them (all of them
        where params.history). `grammars` builds the constraint of params.structured_output (ConstraintError if
        the library refuses it; ValueError if there is none to build it with). `prompt`: its ids (or only the
        distinct ones), which repetition_penalty penalizes too."""
        constraint = None
        if params.structured_output:
            if grammars is None:
                raise ConstraintError("this model has no tokenizer to constrain its output with")
            constraint = grammars.make(params.structured_output, frozenset(ending_ids) | set(params.stop_token_ids))
        s = cls(params, ending_ids, constraint=constraint, vocab=None if grammars is None else grammars.words,
                prompt_seen=frozenset(prompt) if params.repetition_penalty != 1.0 else frozenset())
        s.seen(generated)
        for _ in range(draws):
            s._uniform()
        return s

    def seen(self, tokens: Sequence[int]) -> None:
        """Count tokens generated (here, or outside this sampler: prefill's first token, a resumed stream's) and
        advance the grammar over them."""
        for t in tokens:
            self.counts[t] = self.counts.get(t, 0) + 1
            if self.constraint is not None:
                self.constraint.advance(t)

    def _uniform(self) -> float:
        self.draws += 1
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def sample(self, logits: torch.Tensor) -> tuple[int, float]:
        """logits [V] (any float dtype) -> (token id, log-probability under the model's unmodified distribution)."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if self.params.top_logprobs:
            top = torch.topk(logprobs, min(self.params.top_logprobs, logprobs.numel()))
            self.last_top = list(zip(top.indices.tolist(), top.values.tolist()))
        if self.vocab is not None and self.vocab < logits.numel():  # padding rows: never a token
            logits = logits.index_fill(0, torch.arange(self.vocab, logits.numel(), device=logits.device),
                                       float("-inf"))
        if self.params.logit_bias:
            logits = _biased(logits, self.params.logit_bias)
        if self.params.repetition_penalty != 1.0 and (self.counts or self.prompt_seen):
            logits = _repeated(logits, self.prompt_seen.union(self.counts), self.params.repetition_penalty)
        if (self.params.presence_penalty or self.params.frequency_penalty) and self.counts:
            logits = _penalized(logits, self.counts, self.params)
        if self.draws < self.params.min_tokens:  # draws = tokens this sequence has made so far
            held = [t for t in (*self.ending_ids, *self.params.stop_token_ids) if t < logits.numel()]
            if held:
                logits = logits.index_fill(0, torch.tensor(held, device=logits.device), float("-inf"))
        if self.constraint is not None:
            logits = self.constraint.allowed(logits)
        if self.params.greedy:
            token = int(torch.argmax(logits))
            self._uniform()  # keep draws aligned with tokens, so resumption is position-exact
            self.seen((token,))
            self._prefetch()
            return token, float(logprobs[token])
        probs = _filtered_probs(logits, self.params)
        # inverse-CDF with one uniform draw: independent of thread count and reproducible from the seed
        cdf = torch.cumsum(probs, dim=-1)
        u = self._uniform() * float(cdf[-1])
        point = torch.tensor([u], dtype=cdf.dtype, device=cdf.device)
        token = int(torch.searchsorted(cdf, point).clamp(max=cdf.numel() - 1))
        while probs[token] == 0:  # u landed exactly on a boundary of a zeroed entry
            token -= 1
        self.seen((token,))
        self._prefetch()
        return token, float(logprobs[token])

    def _prefetch(self) -> None:
        """The next position's grammar mask, started now: it runs while the next forward pass does."""
        if self.constraint is not None:
            self.constraint.prefetch()


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scaled = logits / p.temperature
    top = scaled.max()
    if torch.isinf(top) or torch.isnan(top):
        # a temperature (or a repetition penalty) so small that the logits overflow: the distribution's limit,
        # the most likely tokens alike (softmax of infinities has no numbers)
        scaled = torch.where(logits == logits.max(), 0.0, float("-inf"))
    if p.top_k and p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled.double(), dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = (cum - sorted_probs) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def _penalized(logits: torch.Tensor, counts: dict[int, int], p: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, -(p.presence_penalty + p.frequency_penalty * n))


def _repeated(logits: torch.Tensor, seen: frozenset[int], penalty: float) -> torch.Tensor:
    """transformers' and vLLM's repetition penalty: the logit of every token seen in the prompt or the output so
    far is divided by `penalty` where positive and multiplied by it where negative."""
    ids = torch.tensor(sorted(t for t in seen if t < logits.numel()), dtype=torch.long, device=logits.device)
    got = logits.index_select(0, ids)
    return logits.index_copy(0, ids, torch.where(got > 0, got / penalty, got * penalty))


def _biased(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, values)


def greedy_batch(logits: torch.Tensor, vocab: int | None = None) -> tuple[list[int], list[float]]:
    """Argmax for a whole batch at once: logits [B, V] -> ids, logprobs; rows from `vocab` on (embedding padding
    past the tokenizer) are never chosen."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.argmax(logits if vocab is None or vocab >= logits.shape[-1] else logits[:, :vocab], dim=-1)
    return ids.tolist(), logprobs.gather(1, ids[:, None])[:, 0].tolist()
