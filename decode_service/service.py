"""The DecodeService servicer: checkpoint in, token stream out.

Per request, on the event loop: lease the checkpoint (the store refuses another model's with
FAILED_PRECONDITION), map and check it (shapes, dtypes, checksums: FAILED_PRECONDITION / DATA_LOSS), read the
Handoff record and stream the first token that prefill sampled. Then the sequence waits for a batch slot; the
stepping thread copies its state out of shared memory into the slot and releases the lease, and its first step
consumes that first token. Outputs arrive through an asyncio.Queue per request; several waiting outputs are
merged into one chunk. Cancellation (client gone, deadline) takes the sequence out of the batch before the next
step and releases the lease if the state was never copied.

Resume points: the hand-off checkpoint is not deleted when its state is loaded but kept (unpinned) while the
stream lives, and announced to the client (DecodeChunk.resume_point), so that if this service dies the stream
resumes from the exact state it started from (decode_service/runner.py replays the tokens after it). With
--decode-checkpoint-every N the stepping thread copies a sequence's state out every N tokens; it is stored here,
announced, and replaces the previous resume point (deleted). While the stream lives, its resume point is leased
(renewed every third of the store's lease TTL), so store pressure cannot evict it; the stream's last resume point
is deleted when it ends. Those of a service that died stay leased for at most one TTL (the time a client has to
resume exactly), then go with the store's LRU eviction.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import AsyncCacheStoreClient
from qwenpd.decode_service.config import DecodeConfig
from qwenpd.decode_service.runner import DecodeRunner, DecodeSequence, Output, ReadGuard
from qwenpd.decode_service.state import state_from_checkpoint
from qwenpd.engine import state_spec
from qwenpd.engine.constraint import ConstraintError
from qwenpd.engine.engine import Engine
from qwenpd.engine.output import FINISH_LENGTH, FINISH_STOP, OutputTracker
from qwenpd.engine.pages import kv_tokens
from qwenpd.engine.sampling import Sampler
from qwenpd.engine.tokenizer import candidates
from qwenpd.handoff import Handoff, StreamRecord, sampling_from_pb
from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from qwenpd.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, QwenpdError
from qwenpd.metrics import DecodeMetrics

log = logging.getLogger(__name__)

_FINISH = {FINISH_STOP: common_pb2.FINISH_REASON_STOP, FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH}


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    """Create inside the running event loop, `await start()` (loads the model on the stepping thread) before
    serving, `stop()` after."""

    def __init__(self, config: DecodeConfig, store: AsyncCacheStoreClient, make_engine: Callable[[], Engine],
                 metrics: DecodeMetrics | None = None):
        self.config = config
        self.store = store
        self._loop = asyncio.get_running_loop()
        self._background: set[asyncio.Task] = set()
        self.runner = DecodeRunner(make_engine, config.max_batch, config.max_queue, self._deliver,
                                   config.checkpoint_every, config.num_speculative_tokens,
                                   config.speculative_max_batch, config.speculative_policy)
        self.metrics = metrics or DecodeMetrics()
        self.metrics.watch(self.runner)
        self.runner.on_replay = self.metrics.replayed.inc
        self.runner.on_checkpoint_copy = self.metrics.checkpoint_copy.observe
        self.engine: Engine | None = None

    async def start(self) -> Engine:
        self.engine = e = await asyncio.to_thread(self.runner.start)
        self._shapes = lambda n: state_spec.handoff_shapes(e.config, n)  # the draft state may come along
        self._dtypes = state_spec.handoff_dtypes(e.config, e.dtype)
        return e

    def stop(self) -> None:
        self.runner.stop()

    # ---- stepping thread -> event loop -------------------------------------------------------------------------
    def _deliver(self, items: list[tuple[DecodeSequence, Output]]) -> None:
        self._loop.call_soon_threadsafe(self._dispatch, items)

    def _dispatch(self, items: list[tuple[DecodeSequence, Output]]) -> None:
        for seq, out in items:
            if out.checkpoint is not None:
                tensors, out.checkpoint = out.checkpoint, None
                if not seq.ended and not seq.writing:
                    seq.writing = True
                    self._spawn(self._store_resume_point(seq, tensors, out.record))
            seq.sink.put_nowait(out)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_resume_point(self, seq: DecodeSequence, tensors: dict, record) -> None:
        """Store a decode-side checkpoint; announce it and drop the previous resume point, unless the stream ended
        meanwhile (then drop this one). A failure only costs the stream a longer replay if it is resumed."""
        assert self.engine is not None
        started = time.monotonic()
        try:
            meta = CheckpointMeta(self.engine.fingerprint, record.num_tokens, record.to_metadata())
            checkpoint_id = await self.store.put_checkpoint(tensors, meta, handoff_ttl_s=0)
        except QwenpdError as exc:
            log.warning("decode checkpoint of %s not stored: %s", seq.request_id, exc.message)
            return
        finally:
            seq.writing = False
            del tensors
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_write.observe(time.monotonic() - started)
        if seq.ended:
            await _delete_quietly(self.store, checkpoint_id)
            return
        previous, seq.resume_id = seq.resume_id, checkpoint_id
        seq.sink.put_nowait(Output([], [], "", resume=(checkpoint_id, record.num_tokens)))
        if previous:
            await _delete_quietly(self.store, previous)

    async def _pin_resume_point(self, seq: DecodeSequence, ended: asyncio.Event) -> None:
        """Keep the stream's current resume point leased until the stream ends (a new one is leased before the
        old one's lease is released)."""
        assert self.engine is not None
        lease, pinned, renew_at = "", "", 0.0
        try:
            while not seq.ended and seq.resume_id:
                if seq.resume_id != pinned or time.monotonic() >= renew_at:
                    target = seq.resume_id
                    try:
                        new, ttl = await self.store.pin(target, self.engine.fingerprint)
                    except QwenpdError as exc:  # gone (deleted, evicted before the pin): nothing to keep
                        log.info("resume point %s of %s not pinned: %s", target, seq.request_id, exc.message)
                        return
                    if lease:
                        await _release(self.store, lease)
                    lease, pinned, renew_at = new, target, time.monotonic() + ttl / 3
                try:
                    await asyncio.wait_for(ended.wait(), min(1.0, max(0.0, renew_at - time.monotonic())))
                except asyncio.TimeoutError:
                    pass
        finally:
            if lease:
                await _release(self.store, lease)

    def _release_later(self, lease_id: str) -> Callable[[], None]:
        """A callable (any thread) that releases the lease; the checkpoint stays as the stream's resume point."""
        return lambda: self._loop.call_soon_threadsafe(self._spawn, _release(self.store, lease_id))

    # ---- rpcs ----------------------------------------------------------------------------------------------------
    async def Decode(self, request: decode_pb2.DecodeRequest, context):
        if not request.checkpoint_id:
            raise InvalidArgument("checkpoint_id", "is required")
        self.runner.scheduler.check_room()  # refuse before touching the checkpoint
        seq = await self._acquire(request)
        submitted = False
        try:
            self.runner.scheduler.check_room(self.runner.pages_of(seq))  # KV pages, before the first token goes out
            first = seq.sink.get_nowait()  # the token prefill sampled (none when resumed), queued by _acquire
            chunk = self._chunk(seq, [first])
            if chunk.token_ids or chunk.HasField("resume_point"):
                yield chunk
            first_at = time.monotonic()
            if first.finish_reason is not None:
                return
            self.runner.submit(seq)
            submitted = True
            seq.pin = asyncio.Event()  # set when the stream ends: the pin's lease goes then
            self._spawn(self._pin_resume_point(seq, seq.pin))
            while True:
                outs = [await seq.sink.get()]
                while not seq.sink.empty():
                    outs.append(seq.sink.get_nowait())
                errors = [o.error for o in outs if o.error is not None]
                if errors:
                    if any(o.token_ids for o in outs):  # what it made before it failed (one sequence's error)
                        yield self._chunk(seq, outs)
                    raise errors[0]
                chunk = self._chunk(seq, outs)
                yield chunk
                if chunk.HasField("finish_reason"):
                    n = len(seq.tracker.token_ids)
                    if n > 1:
                        self.metrics.tpot.observe((time.monotonic() - first_at) / (n - 1))
                    return
        finally:
            if submitted and seq.finish_reason is None:  # cancelled, deadline, or failed: free the slot now
                self.runner.cancel(seq)
            seq.ended = True
            if seq.pin is not None:
                seq.pin.set()  # its lease on the resume point goes now (not a cancel: a lease being granted would leak)
            seq.guard.abandon()  # releases now unless the stepping thread has (or had) the bytes
            if seq.resume_id:  # the stream is over: nobody resumes it (freed once no lease holds it)
                self._spawn(_delete_quietly(self.store, seq.resume_id))

    async def _acquire(self, request: decode_pb2.DecodeRequest) -> DecodeSequence:
        """Lease and check the checkpoint; a DecodeSequence (state not yet loaded) whose sink holds the first token."""
        e = self.engine
        assert e is not None
        started = time.monotonic()
        try:
            ckpt = await self.store.get_checkpoint(request.checkpoint_id, e.fingerprint, self._shapes, self._dtypes)
        except DataLoss:  # corrupt bytes help nobody: drop the single-use checkpoint and its hand-off pin now
            await _delete_quietly(self.store, request.checkpoint_id)
            raise
        self.metrics.handoff_read.observe(time.monotonic() - started)
        guard = ReadGuard(self._release_later(ckpt.lease_id))
        try:
            handoff = Handoff.from_metadata(dict(ckpt.metadata), e.config.vocab_size)
            params = handoff.sampling
            if request.HasField("sampling"):  # the seed stays prefill's: the random stream continues
                params = dataclasses.replace(
                    sampling_from_pb(request.sampling, self.config.default_max_tokens, e.config.vocab_size),
                    seed=params.seed)
                self.config.limits.check_sampling(params)
        except BaseException:
            guard.abandon()
            self._spawn(_delete_quietly(self.store, request.checkpoint_id))  # used up, as by a stream
            raise
        if params.structured_output != handoff.sampling.structured_output:
            guard.abandon()  # the checkpoint stays: a call with prefill's grammar (or none given) can still use it
            raise InvalidArgument("sampling.structured_output", "must be the one the prompt was prefilled with: the "
                                  "output so far (prefill's first token at least) was sampled under it")
        tensors, num_tokens = ckpt.tensors, ckpt.num_tokens
        delivered = handoff.first_token_delivered  # resumed: first_token and replay_ids were streamed already
        draft = state_spec.split_draft(tensors)
        try:
            draft = self._draft_state(params, draft, delivered)
        except BaseException:
            guard.abandon()  # the checkpoint stays: a call with sampling.speculative = false can still use it
            raise
        fed = 1 + len(handoff.replay_ids) if delivered else 0  # tokens consumed before the first new one
        kv = kv_tokens(num_tokens, fed, params.max_tokens, e.config.max_position_embeddings,
                       self.config.num_speculative_tokens if draft is not None else 0)
        tracker = OutputTracker(params, e.eos_token_ids, e.tokenizer, handoff.prompt_tail_ids)
        tracker.restore(handoff.pending_text, handoff.detok_unread)  # a resumed request's held-back output
        generated = handoff.generated_ids if delivered else (*handoff.generated_ids, handoff.first_token)
        stream = StreamRecord.from_metadata(ckpt.metadata)
        try:
            sampler = await self._sampler(params, handoff, generated)
        except BaseException:
            guard.abandon()
            raise
        seq = DecodeSequence(
            request_id=request.request_id or handoff.request_id,
            load=lambda: state_from_checkpoint(e, tensors, num_tokens, kv - num_tokens, ckpt.locations),
            guard=guard, kv_tokens=kv,
            sampler=sampler,
            tracker=tracker,
            next_token=handoff.first_token, num_tokens=num_tokens, max_context=e.config.max_position_embeddings,
            sink=asyncio.Queue(), prompt_tokens=handoff.prompt_tokens, cached_tokens=handoff.cached_tokens,
            image_tokens=handoff.image_tokens,
            replay=collections.deque(handoff.replay_ids), stream=stream, checkpointed_at=num_tokens,
            resume_id=request.checkpoint_id, draft=draft)
        if stream is not None:
            seq.tail.extend(stream.tail)
        resume = (request.checkpoint_id, num_tokens) if stream is not None else None
        if delivered:  # nothing to stream before the replay: only where to resume from
            seq.sink.put_nowait(Output([], [], "", resume=resume))
            return seq
        first_top = [(i, lp) for i, lp, _ in handoff.first_top] if params.top_logprobs else None
        first = seq.push(handoff.first_token, handoff.first_logprob, first_top)
        first.resume = resume
        seq.sink.put_nowait(first)
        return seq

    async def _sampler(self, params, handoff: Handoff, generated: tuple[int, ...]) -> Sampler:
        """The sequence's sampler, advanced past the tokens made before. With a grammar, it is built and its first
        mask computed on a worker thread (a costly grammar takes up to a second: engine/constraint.py), stalling
        neither the event loop nor the stepping thread; one the library cannot follow is INVALID_ARGUMENT."""
        e = self.engine
        assert e is not None

        def build() -> Sampler:
            sampler = Sampler.resumed(params, handoff.sampler_draws, e.eos_token_ids,
                                      generated if params.history else (), e.grammars, prompt=handoff.prompt_seen)
            if sampler.constraint is not None:
                sampler.constraint.warm()
            return sampler

        if not params.structured_output:
            return build()
        try:
            return await asyncio.to_thread(build)
        except ConstraintError as exc:
            raise InvalidArgument("sampling.structured_output", str(exc)) from None

    def _draft_state(self, params, draft: dict, resumed: bool) -> dict | None:
        """The draft state this sequence drafts from (None: it decodes one token per step). With speculation on
        and not opted out, a fresh hand-off must carry it: FAILED_PRECONDITION otherwise, never a silent
        recompute of the prompt through the head. A resumed stream drafts from its resume point's draft state
        (decode-side checkpoints carry it too) and decodes without drafts where that has none: the same tokens."""
        k = self.config.num_speculative_tokens
        if params.speculative and not k:
            raise InvalidArgument("sampling.speculative", "this decode service runs no speculative decoding "
                                  "(started without --num-speculative-tokens)")
        if not k or params.speculative is False or (resumed and not draft):
            return None
        if not draft:
            raise FailedPrecondition("the hand-off checkpoint carries no MTP draft state, which this decode "
                                     f"service (--num-speculative-tokens {k}) drafts from: start the prefill "
                                     "service with --num-speculative-tokens too, or send sampling.speculative = "
                                     "false", subject="checkpoint_id", reason="NO_DRAFT_STATE")
        return draft

    def _chunk(self, seq: DecodeSequence, outs: list[Output]) -> decode_pb2.DecodeChunk:
        chunk = decode_pb2.DecodeChunk(token_ids=[t for o in outs for t in o.token_ids],
                                       logprobs=[p for o in outs for p in o.logprobs],
                                       text="".join(o.text for o in outs))
        resumes = [o.resume for o in outs if o.resume is not None]
        if resumes:
            chunk.resume_point.checkpoint_id, chunk.resume_point.num_tokens = resumes[-1]
        tok = self.engine.tokenizer if self.engine is not None else None
        if seq.sampler.params.top_logprobs:
            chunk.top_logprobs.extend(
                common_pb2.TopLogprobs(candidates=[common_pb2.TopLogprob(id=i, logprob=lp, text=t, bytes=b)
                                                   for i, lp, t, b in candidates(tok, top)])
                for o in outs for top in o.top)
        if seq.sampler.params.token_bytes and tok is not None:
            chunk.token_bytes.extend(tok.token_bytes(t) for t in chunk.token_ids)
        self.metrics.tokens.inc(len(chunk.token_ids))
        reason = outs[-1].finish_reason
        if reason is not None:
            chunk.finish_reason = _FINISH[reason]
            chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=seq.prompt_tokens, cached_tokens=seq.cached_tokens,
                                                  completion_tokens=len(seq.tracker.token_ids),
                                                  image_tokens=seq.image_tokens))
        return chunk

    async def GetLoad(self, request: decode_pb2.GetLoadRequest, context) -> decode_pb2.Load:
        load = self.runner.load_info()
        return decode_pb2.Load(active_sequences=load.active, free_slots=load.free_slots, queued=load.queued,
                               max_batch=load.max_batch)


async def _delete_quietly(store: AsyncCacheStoreClient, checkpoint_id: str) -> None:
    try:
        await store.delete(checkpoint_id)
    except NotFound as exc:  # already gone: e.g. a resume prefill took the stream's resume point over
        log.info("checkpoint %s not deleted: %s", checkpoint_id, exc.message)
    except QwenpdError as exc:
        log.warning("deleting checkpoint %s: %s", checkpoint_id, exc.message)


async def _release(store: AsyncCacheStoreClient, lease_id: str) -> None:
    """End the read lease (the checkpoint stays, unpinned, as a resume point); a failure never fails the request."""
    try:
        await store.release(lease_id)
    except QwenpdError as exc:
        log.warning("releasing lease %s: %s", lease_id, exc.message)
