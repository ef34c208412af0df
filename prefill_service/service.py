"""The PrefillService servicer: validate on the event loop, encode on the worker thread, answer with a handle.

The worker runs the whole job for one request: chunked prefill (deadline and cancellation checked between
chunks), sampling of the first token from the last logits, and the hand-off checkpoint (the state after ALL
prompt tokens) written straight into the cache store's shared memory. Decode's first step consumes the first
token sampled here, so no token is computed twice.

A resumed request (resume_generated = n) is not prefilled over prompt + generated tokens: that sums differently
from the decode steps that produced them, and a near-tie would then flip the continuation. Its state is the one
the failed decode had at its last resume point (resume_checkpoint_id: the hand-off or a decode-side checkpoint,
used when its stream record matches), else the original prompt prefilled again as the first time; the hand-off
then asks decode to replay the generated tokens after that point through its own step (decode_service/runner.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.engine.engine import Engine
from qwenpd.engine.constraint import THINK_END, ConstraintError, parse_spec
from qwenpd.engine.sampling import MAX_TOP_LOGPROBS, Sampler, SamplingParams
from qwenpd.engine.mtp import PromptDrafts
from qwenpd.engine.tokenizer import candidates
from qwenpd.engine.tokenizer import IncrementalDetokenizer
from qwenpd.prefill_service.config import PrefillConfig
from qwenpd.prefill_service.media import EncoderCache, PromptImages, embed
from qwenpd.prefill_service.prefix import PrefixCache
from qwenpd.engine import state_spec
from qwenpd.handoff import (PROMPT_TAIL, STREAM_TAIL, Handoff, StreamRecord, prompt_digest, sampling_from_pb,
                            with_seed)
from qwenpd.prefill_service.prompt import encode_prompt, prompt_capacity
from qwenpd.prefill_service.resume import Resume, resume_point
from qwenpd.prefill_service.queue import Job, WorkQueue
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from qwenpd.engine.pages import OutOfPages
from qwenpd.errors import InvalidArgument, QwenpdError, ResourceExhausted
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
    scores: list[tuple[float, list[tuple[int, float]]]] | None = None  # prompt_logprobs: Engine.prefill_scored's
    encoder_ns: int = 0  # the vision tower's share of prefill_ns


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
        # the vision tower's output per image (and tenant): a repeated image skips the tower
        self.encoders = (EncoderCache(config.encoder_cache_bytes)
                         if engine.vision is not None and config.encoder_cache_bytes else None)
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
        if params.structured_output:  # a grammar's check builds its lexer: up to a second, off the event loop
            params = await asyncio.to_thread(self._constrained, params, prompt.reasoning_open)
        if params.speculative and self.engine.draft_head is None:
            raise InvalidArgument("sampling.speculative", "this deployment runs no speculative decoding (its "
                                  "services were started without --num-speculative-tokens)")
        resume = resume_point(params, ids, request.resume_generated, self.engine)
        remaining = context.time_remaining()
        job = Job(request_id, deadline=None if remaining is None else time.monotonic() + remaining)
        salt = request.cache_salt if request.HasField("cache_salt") else None
        resume_from = request.resume_checkpoint_id
        if resume_from and not resume.draws:
            raise InvalidArgument("resume_checkpoint_id", "is only valid with resume_generated > 0")
        score = request.prompt_logprobs if request.HasField("prompt_logprobs") else None
        if score is not None and score > MAX_TOP_LOGPROBS:
            raise InvalidArgument("prompt_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {score}")
        if score is not None and resume.draws:
            raise InvalidArgument("prompt_logprobs", "is not valid with resume_generated (the prompt was scored)")
        images = prompt.images
        if images is not None and score is not None and self.engine.tp > 1:
            raise InvalidArgument("prompt_logprobs", "scoring a prompt with images is not served with tensor "
                                  "parallelism (--tp > 1)")
        done = await self.queue.run(job, lambda j: self._encode(j, ids, resume, salt, resume_from, score, images))
        self.served += 1
        h = done.handoff
        self._observe(done, arrived)
        timings = prefill_pb2.PrefillTimings(queue_ns=done.queue_ns, cache_restore_ns=done.restore_ns,
                                             prefill_ns=done.prefill_ns,
                                             checkpoint_write_ns=done.write_ns,
                                             total_ns=time.monotonic_ns() - arrived, encoder_ns=done.encoder_ns)
        return prefill_pb2.PrefillResponse(
            request_id=request_id, checkpoint_id=done.checkpoint_id,
            first_token=common_pb2.Token(id=ids[-1] if resume.draws else h.first_token, text=h.first_text,
                                         logprob=h.first_logprob,
                                         top_logprobs=h.to_pb().first_token.top_logprobs),
            prompt_tokens=h.prompt_tokens, cached_tokens=h.cached_tokens, timings=timings,
            prompt_token_ids=ids if request.return_prompt_token_ids else [], reasoning_open=prompt.reasoning_open,
            prompt_logprobs=self._prompt_logprobs(ids, done.scores) if done.scores is not None else [],
            image_tokens=h.image_tokens)

    def _prompt_logprobs(self, ids: list[int], scores: list[tuple[float, list[tuple[int, float]]]]
                         ) -> list[common_pb2.Token]:
        """PrefillResponse.prompt_logprobs: each prompt token with its own text and bytes (the first: logprob 0, no
        candidates)."""
        tok = self.engine.tokenizer
        return [common_pb2.Token(id=t, logprob=lp, text=tok.token_text(t) if tok else "",
                                 bytes=tok.token_bytes(t) if tok else b"",
                                 top_logprobs=[common_pb2.TopLogprob(id=i, logprob=v, text=c, bytes=b)
                                               for i, v, c, b in candidates(tok, top)])
                for t, (lp, top) in zip(ids, [(0.0, []), *scores])]

    def _encode(self, job: Job, ids: list[int], resume: Resume, cache_salt: str | None,
                resume_from: str = "", score: int | None = None, images: PromptImages | None = None) -> Encoded:
        """On the worker thread: restore the longest cached prefix, prefill the rest of the prompt (stopping at
        snapshot boundaries), sample the first token, publish new cache entries and write the hand-off checkpoint.
        Resumed: the state at the stream's resume point, or the original prompt's, and no sampling (module doc)."""
        started = time.monotonic_ns()
        queue_ns = int(((job.started_at or job.enqueued_at) - job.enqueued_at) * 1e9)
        prompt_len = len(ids) - resume.draws  # the original prompt
        params = resume.params
        stream, stream_draft = None, {}
        if resume_from:
            stream, stream_draft = self._stream_state(resume_from, ids, prompt_len, params.seed, images)
            self.metrics.resumes.labels("checkpoint" if stream is not None else "recomputed").inc()
        elif resume.draws:
            self.metrics.resumes.labels("recomputed").inc()
        # the MTP head's state for decode's drafts over the prompt (a stream resumed from a checkpoint carries the
        # head's state at its resume point instead); computed for an opted-out request too, so the prefix-cache
        # blocks it adds carry the head's KV
        drafts = (PromptDrafts(self.engine.draft_head, ids[:prompt_len])
                  if self.engine.draft_head is not None and stream is None else None)
        hands_draft = self.engine.draft_head is not None and params.speculative is not False  # to decode
        # a scored prompt computes every position: it neither restores from the prefix cache nor adds to it
        plan = self.prefix.plan(ids[:prompt_len] if stream is None and score is None else (), cache_salt, drafts,
                                images.key_spans() if images is not None else ())
        scores = None
        encoder_ns = 0
        try:
            state = self.prefix.restore(plan) if stream is None else stream
            restored = time.monotonic_ns()
            if stream is None:
                media = None
                if images is not None:  # the tower runs for the items past the restored prefix only
                    embeds = embed(self.engine, images, images.needed(plan.cached_tokens), self.encoders,
                                   cache_salt, self.store, lambda n: self.metrics.stored_embeddings.inc())
                    media = images.prompt_media(prompt_len, embeds, self.engine.config.hidden_size, self.engine.dtype)
                    encoder_ns = time.monotonic_ns() - restored
                logits, state, scores = self._prefill(job, ids[:prompt_len], plan, state, score, drafts, media)
            c = state.num_tokens  # consumed: the prompt, or up to the resume point
            if resume.draws:  # decode feeds ids[c:] and samples after the last: nothing is sampled here
                generated = tuple(ids[prompt_len:]) if params.history else ()
                token, logprob, text, top, draws = ids[c], 0.0, "", (), resume.draws
            else:
                generated = ()
                try:
                    sampler = Sampler.resumed(params, 0, self.engine.eos_token_ids, grammars=self.engine.grammars,
                                              prompt=ids[:prompt_len])
                    token, logprob = sampler.sample(logits)
                except ConstraintError as exc:  # the grammar cannot be followed (engine/constraint.py)
                    raise InvalidArgument("sampling.structured_output", str(exc)) from None
                top = tuple(c[:3] for c in candidates(self.engine.tokenizer, sampler.last_top))
                text = IncrementalDetokenizer(self.engine.tokenizer, ids).push(token) if self.engine.tokenizer else ""
                draws = sampler.draws
            computed = time.monotonic_ns()
            handoff = Handoff(request_id=job.request_id, first_token=token, first_logprob=logprob, first_text=text,
                              sampling=params, sampler_draws=draws,
                              prompt_tokens=prompt_len, cached_tokens=c if stream is not None else plan.cached_tokens,
                              prompt_tail_ids=tuple(ids[-(PROMPT_TAIL + resume.detok_unread):]),
                              pending_text=resume.pending_text, detok_unread=resume.detok_unread,
                              generated_ids=generated, first_top=top, first_token_delivered=bool(resume.draws),
                              replay_ids=tuple(ids[c + 1:]),
                              prompt_seen=tuple(sorted(set(ids[:prompt_len])))
                              if params.repetition_penalty != 1.0 else (),
                              image_tokens=images.image_tokens if images is not None else 0)
            record = StreamRecord(prompt_digest(ids[:prompt_len], images.keys if images is not None else ()),
                                  prompt_len, c, params.seed,
                                  tuple(ids[max(0, c - STREAM_TAIL):c]))
            job.check()  # nobody would read the checkpoint
            meta = CheckpointMeta(self.engine.fingerprint, c, {**handoff.to_metadata(), **record.to_metadata()})
            if stream is None:
                checkpoint_id = self.prefix.handoff(plan, state, meta, self.config.handoff_ttl_s,
                                                    draft=hands_draft)
            else:  # its own copy of every tensor: the old resume point is dropped now
                checkpoint_id = self.prefix.own_checkpoint(state, meta, self.config.handoff_ttl_s,
                                                           stream_draft if hands_draft else {})
                state.release()
                self._delete_quietly(resume_from)
        finally:
            self.prefix.release(plan)
        if job.cancelled.is_set():  # the caller left while we wrote: do not leave it pinned for nobody
            try:
                self.store.delete(checkpoint_id)
            except QwenpdError:
                pass
        return Encoded(checkpoint_id=checkpoint_id, handoff=handoff, queue_ns=queue_ns, restore_ns=restored - started,
                       prefill_ns=computed - restored, write_ns=time.monotonic_ns() - computed, scores=scores,
                       encoder_ns=encoder_ns)

    def _constrained(self, params: SamplingParams, reasoning_open: bool) -> SamplingParams:
        """Check sampling.structured_output (INVALID_ARGUMENT naming it) and, after a prompt that opened the
        model's reasoning, let the reasoning run free until "</think>" (unless the spec says otherwise). The
        resolved spec travels in the hand-off, so decode builds the same grammar state."""
        if not params.structured_output:
            return params
        name = "sampling.structured_output"
        grammars = self.engine.grammars
        if grammars is None:
            raise InvalidArgument(name, "this model has no tokenizer to constrain its output with")
        try:
            spec = parse_spec(params.structured_output)
            if reasoning_open and "after" not in spec:
                params = dataclasses.replace(params, structured_output=json.dumps({**spec, "after": THINK_END}))
            grammars.check(params.structured_output)
        except ConstraintError as exc:
            raise InvalidArgument(name, str(exc)) from None
        return params

    def _prefill(self, job: Job, ids: list[int], plan, state, score: int | None = None, drafts=None, media=None):
        """Prefill `ids` after the plan's cached prefix; (logits of the last token, state, the prompt's scores
        with `score` candidates each (Engine.prefill_scored), None when score is None). `drafts` (mtp.PromptDrafts)
        runs the MTP head over the prompt on the way."""
        try:
            state.reserve(len(ids))  # every page of the prompt at once, before any work
        except OutOfPages as exc:
            raise ResourceExhausted(f"prompt of {len(ids)} tokens does not fit the KV cache: {exc}",
                                    subject="kv_cache", retry_after_s=None) from None

        def between_chunks(s) -> None:
            job.check()
            plan.on_chunk(s)

        if score is not None:
            return self.engine.prefill_scored(ids, score, state, on_chunk=between_chunks, normed=drafts, media=media)
        logits, state = self.engine.prefill(ids[plan.cached_tokens:], state, chunk_size=self.config.chunk_size,
                                            boundaries=plan.boundaries, on_chunk=between_chunks, normed=drafts,
                                            media=media)
        return logits, state, None

    def _stream_state(self, checkpoint_id: str, ids: list[int], prompt_len: int, seed: int | None,
                      images: PromptImages | None = None):
        """The state of a broken stream's resume point and its draft state (host copies; {} if it has none), if
        it is still stored and its stream record matches this request (StreamRecord.matches); (None, {})
        otherwise (the prompt is then recomputed)."""
        e = self.engine
        try:
            ckpt = self.store.get_checkpoint(checkpoint_id, e.fingerprint,
                                             lambda n: state_spec.handoff_shapes(e.config, n),
                                             state_spec.handoff_dtypes(e.config, e.dtype))
        except QwenpdError as exc:
            log.info("resume point %s not used, recomputing the prompt: %s", checkpoint_id, exc.message)
            return None, {}
        try:
            record = StreamRecord.from_metadata(ckpt.metadata)
            why = ("it has no stream record" if record is None or record.num_tokens != ckpt.num_tokens
                   else record.mismatch(ids, prompt_len, seed, images.keys if images is not None else ()))
            if why:
                log.warning("resume point %s does not match the request (%s), recomputing the prompt", checkpoint_id,
                            why)
                return None, {}
            try:
                tensors = dict(ckpt.tensors)
                draft = {name: t.clone() for name, t in state_spec.split_draft(tensors).items()}  # outlive the lease
                return e.state_from_tensors(tensors, ckpt.num_tokens), draft
            except (ValueError, OutOfPages) as exc:
                log.warning("resume point %s not loaded, recomputing the prompt: %s", checkpoint_id, exc)
                return None, {}
        finally:
            ckpt.tensors.clear()
            try:
                self.store.release(ckpt)
            except QwenpdError:
                pass

    def _delete_quietly(self, checkpoint_id: str) -> None:
        try:
            self.store.delete(checkpoint_id)
        except QwenpdError as exc:
            log.info("old resume point %s not deleted: %s", checkpoint_id, exc.message)

    def _observe(self, done: Encoded, arrived_ns: int) -> None:
        m = self.metrics
        m.ttft.observe((time.monotonic_ns() - arrived_ns) / 1e9)
        m.queue.observe(done.queue_ns / 1e9)
        m.restore.observe(done.restore_ns / 1e9)
        m.compute.observe(done.prefill_ns / 1e9)
        m.write.observe(done.write_ns / 1e9)
        m.prompt_tokens.inc(done.handoff.prompt_tokens)
        m.image_tokens.inc(done.handoff.image_tokens)
        m.cached_tokens.inc(done.handoff.cached_tokens)

    async def GetModelInfo(self, request: prefill_pb2.GetModelInfoRequest, context) -> prefill_pb2.ModelInfo:
        e, c = self.engine, self.config
        return prefill_pb2.ModelInfo(
            model_name=c.name, fingerprint=e.fingerprint,
            dtype=str(e.dtype).removeprefix("torch."), vocab_size=e.config.vocab_size,
            max_context=e.config.max_position_embeddings, chunk_size=c.chunk_size,
            eos_token_ids=sorted(e.eos_token_ids),
            has_chat_template=bool(e.tokenizer is not None and e.tokenizer.chat_template),
            vision=e.vision is not None,
            max_prompt_chars=0 if e.tokenizer is None else e.tokenizer.max_text_chars(
                prompt_capacity(e, self.config.limits)))
