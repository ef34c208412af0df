"""The in-process generation loop used by `qwenpd generate --model` and as the services' oracle in tests:
prefill, then one decode step per token in a batch of one."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from qwenpd.engine.engine import DecodeBatch
from qwenpd.engine.output import OutputTracker
from qwenpd.engine.pages import kv_tokens
from qwenpd.engine.sampling import Sampler, SamplingParams


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    prefill_s: float
    decode_s: float
    draft_tokens: int = 0  # speculative: drafts proposed
    accepted_tokens: int = 0  # speculative: drafts that were the tokens chosen
    accepted_at: list[int] | None = None  # speculative: accepted drafts per draft position (1st, 2nd, ...)
    verify_steps: int = 0  # speculative: verify passes (each emits its accepted drafts and one more token)
    rollback_bytes: int = 0  # speculative: the most bytes one verify pass kept for undoing rejected drafts


def generate(engine, prompt_ids: Sequence[int], params: SamplingParams, chunk_size: int = 512,
             on_text: Callable[[str], None] | None = None, media=None) -> GenerationResult:
    """Prefill, sample the first token from the last logits, then decode one token per step until finished.
    `media`: the prompt's images (engine/vision.py PromptMedia; prompt_ids with their placeholders expanded)."""
    sampler = Sampler.resumed(params, 0, engine.eos_token_ids, grammars=engine.grammars, prompt=prompt_ids)
    tracker = OutputTracker(params, engine.eos_token_ids, engine.tokenizer, prompt_ids)
    t0 = time.perf_counter()
    logits, state = engine.prefill(prompt_ids, chunk_size=chunk_size, media=media)
    token, logprob = sampler.sample(logits)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    batch = DecodeBatch(engine, max_batch=1)
    batch.add(state)
    while not _emit(tracker, token, logprob, on_text):
        logits = batch.step([token])[0]
        token, logprob = sampler.sample(logits)
    decode_s = time.perf_counter() - t1
    return GenerationResult(token_ids=tracker.token_ids, text=tracker.text, finish_reason=tracker.finish_reason,
                            logprobs=tracker.logprobs, prefill_s=prefill_s, decode_s=decode_s)


def _emit(tracker: OutputTracker, token: int, logprob: float, on_text: Callable[[str], None] | None) -> bool:
    """Push a chosen token to the output (its text to on_text); whether the sequence has finished."""
    delta = tracker.push(token, logprob)
    if on_text is not None and delta:
        on_text(delta)
    return tracker.finish_reason is not None


def generate_speculative(engine, head, prompt_ids: Sequence[int], params: SamplingParams, k: int,
                         chunk_size: int = 512, rollback: str = "auto",
                         on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """`generate` with k drafts per step from the checkpoint's MTP head (`head`, an engine/mtp.py MTPHead) and one
    verify pass of k+1 positions (engine/speculative.py): the same tokens and log-probabilities as `generate`,
    greedy or seeded sampling alike, in fewer passes over the weights. Prefill also runs the head over the prompt,
    chunk by chunk as the prefill service does (mtp.PromptDrafts: its time is prefill_s), so the first step drafts
    already."""
    from qwenpd.engine.mtp import PromptDrafts
    from qwenpd.engine.speculative import Drafter, rollback_bytes

    if k < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
    sampler = Sampler.resumed(params, 0, engine.eos_token_ids, grammars=engine.grammars, prompt=prompt_ids)
    tracker = OutputTracker(params, engine.eos_token_ids, engine.tokenizer, prompt_ids)
    t0 = time.perf_counter()
    state = engine.new_state()
    prompt = PromptDrafts(head, list(prompt_ids), state)  # the head reads (hidden at t, token t+1) as chunks come
    logits, state = engine.prefill(prompt_ids, state, chunk_size=chunk_size, normed=prompt)
    token, logprob = sampler.sample(logits)
    # the pages of the longest generation, and of the k positions past it the head's drafts may write (its KV is
    # in the sequence's pages: mtp.MTPCache), as the decode service promises them
    state.reserve(kv_tokens(len(prompt_ids), 0, params.max_tokens, engine.config.max_position_embeddings, k))
    drafter = Drafter(head, sampler.vocab, prompt.cache)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    drafted = accepted = steps = kept = 0
    at = [0] * k
    # the first token closes the prompt: the head reads the last prompt position with it and drafts after it
    drafts = drafter.draft(prompt.pending[None], [token], len(prompt_ids) - 1, k)
    batch = DecodeBatch(engine, max_batch=1)
    batch.add(state)
    while not _emit(tracker, token, logprob, on_text):
        room = min(engine.config.max_position_embeddings - state.num_tokens - 1,  # context left after `token`
                   params.max_tokens - len(tracker.token_ids) - 1)  # tokens left after the next one
        drafts = drafts[:max(0, room)]
        fed = [token, *drafts]
        done = batch.verify([fed], rollback)
        drafted += len(drafts)
        steps += 1
        kept = max(kept, rollback_bytes(done))
        chosen: list[tuple[int, float]] = []
        for i in range(len(fed)):  # as plain decoding would choose, position by position
            t, lp = sampler.sample(done.logits[i])
            chosen.append((t, lp))
            if i == len(drafts) or t != drafts[i]:
                break
            accepted += 1
            at[i] += 1
            if _emit(tracker, t, lp, on_text):  # a draft that is the chosen token: streamed now
                break
        batch.accept([len(chosen)])
        if tracker.finish_reason is not None:
            break
        token, logprob = chosen[-1]
        drafts = drafter.draft(done.hidden[:len(chosen)], [t for t, _ in chosen], done.starts[0], k)
    decode_s = time.perf_counter() - t1
    batch.remove(state)
    state.release()
    return GenerationResult(token_ids=tracker.token_ids, text=tracker.text, finish_reason=tracker.finish_reason,
                            logprobs=tracker.logprobs, prefill_s=prefill_s, decode_s=decode_s,
                            draft_tokens=drafted, accepted_tokens=accepted, accepted_at=at, verify_steps=steps,
                            rollback_bytes=kept)
