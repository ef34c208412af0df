"""The in-process generation loop used by `qwenpd generate --model` and as the services' oracle in tests:
prefill, then one decode step per token in a batch of one."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from qwenpd.engine.engine import DecodeBatch
from qwenpd.engine.output import OutputTracker
from qwenpd.engine.sampling import Sampler, SamplingParams


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
    sampler = Sampler.resumed(params, 0, engine.eos_token_ids, grammars=engine.grammars, prompt=prompt_ids)
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
    return GenerationResult(token_ids=tracker.token_ids, text=tracker.text, finish_reason=tracker.finish_reason,
                            logprobs=tracker.logprobs, prefill_s=prefill_s, decode_s=decode_s)
