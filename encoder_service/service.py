"""The EncoderService servicer: read and check the media on a thread, run the tower on the worker thread, store
each item's embeddings in the cache store and answer with where they are.

Stored embeddings are keyed by (cache salt, content key): an item sent again is answered with the checkpoint that
holds it while the store still has it (leased again for embeddings_ttl_s), so a repeated image is encoded once for
the whole pool's prefill instances."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.encoder_service.config import EncoderConfig
from qwenpd.engine.vision import VisionModel
from qwenpd.errors import QwenpdError, ResourceExhausted
from qwenpd.metrics import EncoderMetrics
from qwenpd.media import EMBEDS, MEDIA_KEY, item_key, media_limits, read_media
from qwenpd.protos.qwenpd.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

KNOWN = 65536  # (salt, key) -> checkpoint entries remembered


class Worker:
    """The one thread that runs the tower (torch work stays on one thread: a second one slows both), with at
    most `max_queue` calls waiting for it (RESOURCE_EXHAUSTED past that)."""

    def __init__(self, max_queue: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self.max_queue = max_queue
        self.waiting = 0

    async def run(self, fn: Callable[[], Any]) -> Any:
        if self.waiting > self.max_queue:
            raise ResourceExhausted(f"{self.waiting} encode calls are waiting (--max-queue {self.max_queue})",
                                    subject="encoder_queue", retry_after_s=1.0)
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self.waiting -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, model: VisionModel, config: EncoderConfig, store: CacheStoreClient, worker: Worker,
                 metrics: EncoderMetrics | None = None):
        self.model = model
        self.config = config
        self.store = store
        self.worker = worker
        self.metrics = metrics or EncoderMetrics()
        self._known: OrderedDict[tuple[str | None, bytes], str] = OrderedDict()
        self._lock = threading.Lock()

    async def Encode(self, request: encoder_pb2.EncodeRequest, context) -> encoder_pb2.EncodeResponse:
        started = time.perf_counter()
        fields = [f"media[{i}]" for i in range(len(request.media))]
        items = await asyncio.to_thread(read_media, list(request.media), fields, self.model,
                                        media_limits(self.config.limits), self.config.limits.max_prompt_tokens)
        keys = [item_key(p) for p in items]
        salt = request.cache_salt if request.HasField("cache_salt") else None
        ids, encoder_ns, reused = await self.worker.run(lambda: self._encode(items, keys, salt))
        self.metrics.encode.observe(time.perf_counter() - started)
        return encoder_pb2.EncodeResponse(items=[common_pb2.EncodedMedia(checkpoint_id=c, key=k)
                                                 for c, k in zip(ids, keys)], encoder_ns=encoder_ns, reused=reused)

    def _encode(self, items, keys, salt) -> tuple[list[str], int, int]:
        """On the worker thread: reuse what is stored, run the tower over the rest (an item at a time), store it."""
        import torch

        ids: list[str] = [""] * len(items)
        missing = []
        for n, key in enumerate(keys):
            known = self._lookup(salt, key)
            if known is not None and self._still_stored(known):
                ids[n] = known
            else:
                missing.append(n)
        reused = len(items) - len(missing)
        self.metrics.items.labels("reused").inc(reused)
        encoder_ns = 0
        for n in missing:  # one tower pass per item: activations of one image at a time
            t0 = time.monotonic_ns()
            e = self.model.encode_images(torch.from_numpy(items[n].values), [items[n].grid])[0]
            encoder_ns += time.monotonic_ns() - t0
            meta = CheckpointMeta(self.model.fingerprint, int(e.shape[0]), {MEDIA_KEY: keys[n].hex()})
            ids[n] = self.store.put_checkpoint({EMBEDS: e}, meta, handoff_ttl_s=self.config.embeddings_ttl_s)
            self._remember(salt, keys[n], ids[n])
        self.metrics.items.labels("computed").inc(len(missing))
        return ids, encoder_ns, reused

    def _still_stored(self, checkpoint_id: str) -> bool:
        """Lease it again for embeddings_ttl_s (the lease ends by itself); False when it is gone."""
        try:
            self.store.pin(checkpoint_id, self.model.fingerprint, ttl_s=self.config.embeddings_ttl_s)
            return True
        except QwenpdError:
            return False

    def _lookup(self, salt: str | None, key: bytes) -> str | None:
        with self._lock:
            found = self._known.get((salt, key))
            if found is not None:
                self._known.move_to_end((salt, key))
            return found

    def _remember(self, salt: str | None, key: bytes, checkpoint_id: str) -> None:
        with self._lock:
            self._known[(salt, key)] = checkpoint_id
            while len(self._known) > KNOWN:
                self._known.popitem(last=False)
