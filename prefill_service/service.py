"""The PrefillService servicer: validate on the event loop, encode on the worker thread, answer with a handle.

The worker runs the whole job for one request: chunked prefill (deadline and cancellation checked between
chunks), sampling of the first token from the last logits, and the hand-off checkpoint (the state after ALL
prompt tokens) written straight into the cache store's shared memory. Decode's first step consumes the first
token sampled here, so no token is computed twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.engine.engine import Engine
from qwenpd.engine.sampling import Sampler
from qwenpd.engine.tokenizer import candidates
from qwenpd.engine.tokenizer import IncrementalDetokenizer
from qwenpd.prefill_service.config import PrefillConfig
from qwenpd.prefill_service.prefix import PrefixCache
from qwenpd.handoff import PROMPT_TAIL, Handoff, sampling_from_pb, with_seed
from qwenpd.prefill_service.prompt import encode_prompt, prompt_capacity
from qwenpd.prefill_service.resume import Resume, resume_point
from qwenpd.prefill_service.queue import Job, WorkQueue
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from qwenpd.engine.pages import OutOfPages
from qwenpd.errors import QwenpdError, ResourceExhausted
from qwenpd.metrics import PrefillMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Encoded:
    """What the worker hands back: the checkpoint handle, the first token and where the time went (ns)."""

    checkpoint_id: str
    handoff: Handoff
    queue_ns: int
    restore_ns: int
    prefill_ns: int
    write_ns: int


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, engine: Engine, config: PrefillConfig, store: CacheStoreClient, queue: WorkQueue,
                 metrics: PrefillMetrics | None = None):
        self.engine = engine
        self.config = config
        self.store = store
        self.queue = queue  # its worker thread loaded the engine and runs every job
        self.metrics = metrics or PrefillMetrics()
        self.metrics.queue_depth.set_function(lambda: queue.waiting)
        self.prefix = PrefixCache(engine, store, config.prefix_policy, config.limits.max_cache_bytes_per_request,
                                  on_skip=self.metrics.uncached.inc, on_written=self.metrics.handoff_bytes.inc)
        self.served = 0

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context) -> prefill_pb2.PrefillResponse:
        arrived = time.monotonic_ns()
        request_id = request.request_id or uuid.uuid4().hex
        # off the event loop: health checks and other requests go on while a long text is tokenized (a piece at a
        # time: prompt.py)
        prompt = await asyncio.to_thread(encode_prompt, request, self.engine, self.config.limits)
        ids = prompt.ids
        params = with_seed(sampling_from_pb(request.sampling, self.config.default_max_tokens,
                                            self.engine.config.vocab_size))
        self.config.limits.check_sampling(params)
        resume = resume_point(params, ids, request.resume_generated, self.engine)
        remaining = context.time_remaining()
        job = Job(request_id, deadline=None if remaining is None else time.monotonic() + remaining)
        salt = request.cache_salt if request.HasField("cache_salt") else None
        done = await self.queue.run(job, lambda j: self._encode(j, ids, resume, salt))
        self.served += 1
        h = done.handoff
        self._observe(done, arrived)
        timings = prefill_pb2.PrefillTimings(queue_ns=done.queue_ns, cache_restore_ns=done.restore_ns,
                                             prefill_ns=done.prefill_ns,
                                             checkpoint_write_ns=done.write_ns,
                                             total_ns=time.monotonic_ns() - arrived)
        return prefill_pb2.PrefillResponse(
            request_id=request_id, checkpoint_id=done.checkpoint_id,
            first_token=common_pb2.Token(id=h.first_token, text=h.first_text, logprob=h.first_logprob,
                                         top_logprobs=h.to_pb().first_token.top_logprobs),
            prompt_tokens=h.prompt_tokens, cached_tokens=h.cached_tokens, timings=timings,
            prompt_token_ids=ids if request.return_prompt_token_ids else [], reasoning_open=prompt.reasoning_open)

    def _encode(self, job: Job, ids: list[int], resume: Resume, cache_salt: str | None) -> Encoded:
        """On the worker thread: restore the longest cached prefix, prefill the rest (stopping at snapshot
        boundaries), sample the first token, publish new cache entries and write the hand-off checkpoint."""
        started = time.monotonic_ns()
        queue_ns = int(((job.started_at or job.enqueued_at) - job.enqueued_at) * 1e9)
        plan = self.prefix.plan(ids, cache_salt)
        try:
            state = self.prefix.restore(plan)
            restored = time.monotonic_ns()
            try:
                state.reserve(len(ids))  # every page of the prompt at once, before any work
            except OutOfPages as exc:
                raise ResourceExhausted(f"prompt of {len(ids)} tokens does not fit the KV cache: {exc}",
                                        subject="kv_cache", retry_after_s=None) from None

            def between_chunks(s) -> None:
                job.check()
                plan.on_chunk(s)

            logits, state = self.engine.prefill(ids[plan.cached_tokens:], state, chunk_size=self.config.chunk_size,
                                                boundaries=plan.boundaries, on_chunk=between_chunks)
            params = resume.params
            generated = tuple(ids[len(ids) - resume.draws:]) if resume.draws and params.penalized else ()
            sampler = Sampler.resumed(params, resume.draws, self.engine.eos_token_ids, generated)
            token, logprob = sampler.sample(logits)
            top = candidates(self.engine.tokenizer, sampler.last_top)
            text = IncrementalDetokenizer(self.engine.tokenizer, ids).push(token) if self.engine.tokenizer else ""
            computed = time.monotonic_ns()
            handoff = Handoff(request_id=job.request_id, first_token=token, first_logprob=logprob, first_text=text,
                              sampling=params, sampler_draws=sampler.draws,
                              prompt_tokens=len(ids) - resume.draws, cached_tokens=plan.cached_tokens,
                              prompt_tail_ids=tuple(ids[-(PROMPT_TAIL + resume.detok_unread):]),
                              pending_text=resume.pending_text, detok_unread=resume.detok_unread,
                              generated_ids=generated, first_top=top)
            job.check()  # nobody would read the checkpoint
            meta = CheckpointMeta(self.engine.fingerprint, state.num_tokens, handoff.to_metadata())
            checkpoint_id = self.prefix.handoff(plan, state, meta, self.config.handoff_ttl_s)
        finally:
            self.prefix.release(plan)
        if job.cancelled.is_set():  # the caller left while we wrote: do not leave it pinned for nobody
            try:
                self.store.delete(checkpoint_id)
            except QwenpdError:
                pass
        return Encoded(checkpoint_id=checkpoint_id, handoff=handoff, queue_ns=queue_ns, restore_ns=restored - started,
                       prefill_ns=computed - restored, write_ns=time.monotonic_ns() - computed)

    def _observe(self, done: Encoded, arrived_ns: int) -> None:
        m = self.metrics
        m.ttft.observe((time.monotonic_ns() - arrived_ns) / 1e9)
        m.queue.observe(done.queue_ns / 1e9)
        m.restore.observe(done.restore_ns / 1e9)
        m.compute.observe(done.prefill_ns / 1e9)
        m.write.observe(done.write_ns / 1e9)
        m.prompt_tokens.inc(done.handoff.prompt_tokens)
        m.cached_tokens.inc(done.handoff.cached_tokens)

    async def GetModelInfo(self, request: prefill_pb2.GetModelInfoRequest, context) -> prefill_pb2.ModelInfo:
        e, c = self.engine, self.config
        return prefill_pb2.ModelInfo(
            model_name=c.name, fingerprint=e.fingerprint,
            dtype=str(e.dtype).removeprefix("torch."), vocab_size=e.config.vocab_size,
            max_context=e.config.max_position_embeddings, chunk_size=c.chunk_size,
            eos_token_ids=sorted(e.eos_token_ids),
            has_chat_template=bool(e.tokenizer is not None and e.tokenizer.chat_template),
            max_prompt_chars=0 if e.tokenizer is None else e.tokenizer.max_text_chars(
                prompt_capacity(e, self.config.limits)))
