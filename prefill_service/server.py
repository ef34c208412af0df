"""Run the prefill service: load the model, connect to the cache store, serve until SIGTERM/SIGINT."""

from __future__ import annotations

from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.engine.device import set_neuron_cores
from qwenpd.engine.engine import Engine
from qwenpd.model_service import build_engine, rank_lost
from qwenpd.prefill_service.config import PrefillConfig
from qwenpd.prefill_service.queue import WorkQueue
from qwenpd.prefill_service.service import PrefillServicer
from qwenpd.grpc_server import OnReady, run_server, serve_main
from qwenpd.metrics import PrefillMetrics


def load_engine(config: PrefillConfig) -> Engine:
    return build_engine(config, config.chunk_size, max_batch=1, graphs=("prefill",))  # warmed up as it loads


async def run(config: PrefillConfig, on_ready: OnReady | None = None) -> None:
    queue: WorkQueue = WorkQueue(config.max_queue)
    store = CacheStoreClient(config.cache, security=config.security)
    metrics = PrefillMetrics()
    engine = None
    try:
        store.info()  # fail at start, not at the first request, if the store is unreachable or on another host
        engine = await queue.call(lambda: load_engine(config))  # on the worker thread, like every job
        await run_server(PrefillServicer(engine, config, store, queue, metrics), listen=config.listen,
                         security=config.security, metrics=metrics, metrics_port=config.metrics_port,
                         grace_s=config.grace_s, on_ready=on_ready, max_message_bytes=config.limits.max_message_bytes,
                         describe=f"prefill {config.name} ({engine.fingerprint[:16]}, {engine.dtype}, "
                                  f"{engine.device}; cache store {config.cache})")
    finally:
        queue.shutdown()
        metrics.close()
        store.close()
        if engine is not None:
            engine.close()  # the other tensor-parallel ranks, if any


def serve(config: PrefillConfig, ready_file: str | None = None) -> int:
    """Run the prefill service in this process until SIGTERM/SIGINT (see qwenpd.grpc_server.serve_main)."""
    set_neuron_cores(config.engine.neuron_cores)  # before anything starts the Neuron runtime in this process
    code = serve_main("prefill", lambda on_ready: run(config, on_ready), ready_file)
    return 1 if rank_lost() else code
