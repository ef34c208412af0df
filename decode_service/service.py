"""The DecodeService servicer: checkpoint in, token stream out.

Per request: lease the checkpoint (the store refuses another model's with FAILED_PRECONDITION), map and check
it (shapes, dtypes, checksums: FAILED_PRECONDITION / DATA_LOSS), copy the state out and release the lease
(deleting the single-use checkpoint: the bytes are no longer needed once copied), emit the first token that
prefill sampled, then join the batch: the stepping thread's first step for this sequence consumes that token.
Outputs arrive through an asyncio.Queue per request; several waiting outputs are merged into one chunk.
Cancellation (client gone, deadline) takes the sequence out of the batch before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import torch

from cache_store.client import AsyncCacheStoreClient
from decode_service.config import DecodeConfig
from decode_service.runner import DecodeRunner, Output, Sequence
from engine.engine import Engine
from engine.generate import FINISH_LENGTH, FINISH_STOP, OutputTracker
from engine.sampling import Sampler
from engine.state import HybridState, expected_shapes
from prefill_service.handoff import Handoff, sampling_from_pb
from protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from qwenpd.grpc_common import InvalidArgument, QwenpdError

log = logging.getLogger(__name__)

_FINISH = {FINISH_STOP: common_pb2.FINISH_REASON_STOP, FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH}


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    """Create inside the running event loop; `start()` the runner before serving, `stop()` after."""

    def __init__(self, engine: Engine, config: DecodeConfig, store: AsyncCacheStoreClient):
        self.engine = engine
        self.config = config
        self.store = store
        self._loop = asyncio.get_running_loop()
        self.runner = DecodeRunner(engine, config.max_batch, config.max_queue, self._deliver)
        cfg = engine.config
        self._shapes = lambda n: expected_shapes(cfg, n)
        self._dtypes = {name: torch.float32 if name.endswith(".recurrent") else engine.dtype
                        for name in expected_shapes(cfg, 0)}

    # ---- stepping thread -> event loop -------------------------------------------------------------------------
    def _deliver(self, items: list[tuple[Sequence, Output]]) -> None:
        if items:
            self._loop.call_soon_threadsafe(_dispatch, items)

    # ---- rpcs ----------------------------------------------------------------------------------------------------
    async def Decode(self, request: decode_pb2.DecodeRequest, context):
        if not request.checkpoint_id:
            raise InvalidArgument("checkpoint_id", "is required")
        self.runner.check_room()  # refuse before touching the checkpoint
        seq = await self._load(request)
        first = seq.sink.get_nowait()  # queued by _load
        yield self._chunk(seq, [first])
        if first.finish_reason is not None:
            return
        self.runner.submit(seq)
        try:
            while True:
                outs = [await seq.sink.get()]
                while not seq.sink.empty():
                    outs.append(seq.sink.get_nowait())
                errors = [o.error for o in outs if o.error is not None]
                if errors:
                    raise errors[0]
                chunk = self._chunk(seq, outs)
                yield chunk
                if chunk.HasField("finish_reason"):
                    return
        finally:
            if seq.finish_reason is None:  # cancelled, deadline, or failed: free the slot now
                self.runner.cancel(seq)

    async def _load(self, request: decode_pb2.DecodeRequest) -> Sequence:
        """Lease, check and copy the checkpoint; release it; a Sequence whose sink holds the first token."""
        e = self.engine
        ckpt = await self.store.get_checkpoint(request.checkpoint_id, e.fingerprint, self._shapes, self._dtypes)
        try:
            handoff = Handoff.from_metadata(dict(ckpt.metadata), e.config.vocab_size)
            params = handoff.sampling
            if request.HasField("sampling"):  # the seed stays prefill's: the random stream continues
                params = dataclasses.replace(
                    sampling_from_pb(request.sampling, self.config.default_max_tokens, e.config.vocab_size),
                    seed=params.seed)
            copy = asyncio.ensure_future(asyncio.to_thread(
                HybridState.from_tensors, e.config, ckpt.tensors, ckpt.num_tokens, e.dtype))
            try:
                state = await asyncio.shield(copy)
            finally:
                if not copy.done():  # cancelled mid-copy: the bytes must stay leased until the copy stops
                    await asyncio.wait([copy])
        finally:
            ckpt.tensors.clear()
            await _release(self.store, ckpt.lease_id)
        tracker = OutputTracker(params, e.eos_token_ids, e.tokenizer, handoff.prompt_tail_ids)
        seq = Sequence(request.request_id or handoff.request_id, state, Sampler.resumed(params, handoff.sampler_draws),
                       tracker, handoff.first_token, e.config.max_position_embeddings, sink=asyncio.Queue(),
                       prompt_tokens=handoff.prompt_tokens, cached_tokens=handoff.cached_tokens)
        seq.sink.put_nowait(seq.push(handoff.first_token, handoff.first_logprob))
        return seq

    def _chunk(self, seq: Sequence, outs: list[Output]) -> decode_pb2.DecodeChunk:
        chunk = decode_pb2.DecodeChunk(token_ids=[t for o in outs for t in o.token_ids],
                                       logprobs=[p for o in outs for p in o.logprobs],
                                       text="".join(o.text for o in outs))
        reason = outs[-1].finish_reason
        if reason is not None:
            chunk.finish_reason = _FINISH[reason]
            chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=seq.prompt_tokens, cached_tokens=seq.cached_tokens,
                                                  completion_tokens=len(seq.tracker.token_ids)))
        return chunk

    async def GetLoad(self, request: decode_pb2.GetLoadRequest, context) -> decode_pb2.Load:
        load = self.runner.load()
        return decode_pb2.Load(active_sequences=load.active, free_slots=load.free_slots, queued=load.queued,
                               max_batch=load.max_batch)


def _dispatch(items: list[tuple[Sequence, Output]]) -> None:
    for seq, out in items:
        seq.sink.put_nowait(out)


async def _release(store: AsyncCacheStoreClient, lease_id: str) -> None:
    """Release and delete the single-use checkpoint; never let a failure here hide the request's own result."""
    try:
        await asyncio.shield(store.release(lease_id, delete=True))
    except QwenpdError as exc:
        log.warning("releasing lease %s: %s", lease_id, exc.message)
