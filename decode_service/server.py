"""Run the decode service: load the model on the stepping thread, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from qwenpd.cache_store.client import AsyncCacheStoreClient
from qwenpd.decode_service.config import DecodeConfig
from qwenpd.decode_service.service import DecodeServicer
from qwenpd.engine.engine import Engine
from qwenpd.prefill_service.config import compile_engine, engine_kwargs, split_address
from qwenpd.grpc_common import GrpcServer, make_server
from qwenpd.metrics import DecodeMetrics

log = logging.getLogger(__name__)


def _engine(config: DecodeConfig) -> Engine:
    engine = Engine(config.model_dir, **engine_kwargs(config))
    compile_engine(engine, config, chunk_size=64, max_batch=config.max_batch)  # decode runs no prefill chunks
    return engine


async def run(config: DecodeConfig, on_ready: Callable[[GrpcServer], None] | None = None) -> None:
    metrics = DecodeMetrics()
    async with AsyncCacheStoreClient(config.cache, security=config.security) as store:
        await store.info()  # fail at start if the store is unreachable or on another host
        servicer = DecodeServicer(config, store, lambda: _engine(config), metrics)
        try:
            engine = await servicer.start()
            host, port = split_address(config.listen)
            server = make_server(servicer, host=host, port=port, security=config.security,
                                 max_message_bytes=config.limits.max_message_bytes, on_status=metrics.record)
            await server.start()
            if config.metrics_port:
                metrics.serve(host, config.metrics_port)
            log.info("decode (%s, %s, max batch %d) on %s, cache store %s", engine.fingerprint[:16], engine.dtype,
                     config.max_batch, server.address, config.cache)
            if on_ready is not None:
                on_ready(server)
            await server.serve_until_signal(grace_s=config.grace_s)
        finally:
            metrics.close()
            servicer.stop()


def serve(config: DecodeConfig, on_ready: Callable[[GrpcServer], None] | None = None) -> int:
    asyncio.run(run(config, on_ready))
    return 0
