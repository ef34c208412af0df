"""Run the prefill service: load the model, connect to the cache store, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.engine.engine import Engine
from qwenpd.prefill_service.config import PrefillConfig, compile_engine, engine_kwargs, split_address
from qwenpd.prefill_service.queue import WorkQueue
from qwenpd.prefill_service.service import PrefillServicer
from qwenpd.grpc_common import GrpcServer, make_server
from qwenpd.metrics import PrefillMetrics

log = logging.getLogger(__name__)


def warm_up(engine: Engine, chunk_size: int) -> None:
    """One short prefill so the first request does not pay for lazy initialisation."""
    engine.prefill(list(range(1, min(8, engine.config.vocab_size))), chunk_size=chunk_size)


def load_engine(config: PrefillConfig) -> Engine:
    engine = Engine(config.model_dir, **engine_kwargs(config))
    compile_engine(engine, config, config.chunk_size, max_batch=1)
    if config.warmup:
        warm_up(engine, config.chunk_size)
    return engine


async def run(config: PrefillConfig, on_ready: Callable[[GrpcServer], None] | None = None) -> None:
    queue: WorkQueue = WorkQueue(config.max_queue)
    store = CacheStoreClient(config.cache, security=config.security)
    metrics = PrefillMetrics()
    try:
        store.info()  # fail at start, not at the first request, if the store is unreachable or on another host
        engine = await queue.call(lambda: load_engine(config))  # on the worker thread, like every job
        servicer = PrefillServicer(engine, config, store, queue, metrics)
        host, port = split_address(config.listen)
        server = make_server(servicer, host=host, port=port, security=config.security,
                             max_message_bytes=config.limits.max_message_bytes, on_status=metrics.record)
        await server.start()
        if config.metrics_port:
            metrics.serve(host, config.metrics_port)
        log.info("prefill %s (%s, %s) on %s, cache store %s", config.name, engine.fingerprint[:16], engine.dtype,
                 server.address, config.cache)
        if on_ready is not None:
            on_ready(server)
        await server.serve_until_signal(grace_s=config.grace_s)
    finally:
        queue.shutdown()
        metrics.close()
        store.close()


def serve(config: PrefillConfig, on_ready: Callable[[GrpcServer], None] | None = None) -> int:
    asyncio.run(run(config, on_ready))
    return 0
