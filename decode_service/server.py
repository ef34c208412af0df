"""Run the decode service: load the model on the stepping thread, serve until SIGTERM/SIGINT."""

from __future__ import annotations

from qwenpd.cache_store.client import AsyncCacheStoreClient
from qwenpd.decode_service.config import DecodeConfig
from qwenpd.decode_service.service import DecodeServicer
from qwenpd.engine.device import set_neuron_cores
from qwenpd.model_service import build_engine, rank_lost
from qwenpd.grpc_server import OnReady, run_server, serve_main
from qwenpd.metrics import DecodeMetrics


async def run(config: DecodeConfig, on_ready: OnReady | None = None) -> None:
    metrics = DecodeMetrics()
    async with AsyncCacheStoreClient(config.cache, security=config.security) as store:
        await store.info()  # fail at start if the store is unreachable or on another host
        # decode runs no prefill chunks (but its start-up check, eagerly): it compiles only its decode graphs
        servicer = DecodeServicer(config, store, lambda: build_engine(config, 64, config.max_batch, ("decode",),
                                                                      config.verify), metrics)
        try:
            engine = await servicer.start()
            await run_server(servicer, listen=config.listen, security=config.security, metrics=metrics,
                             metrics_port=config.metrics_port, grace_s=config.grace_s, on_ready=on_ready,
                             max_message_bytes=config.limits.max_message_bytes,
                             describe=f"decode ({engine.fingerprint[:16]}, {engine.dtype}, {engine.device}, max "
                                      f"batch {config.max_batch}; cache store {config.cache})")
        finally:
            metrics.close()
            servicer.stop()
            if servicer.runner.engine is not None:
                servicer.runner.engine.close()  # the other tensor-parallel ranks, if any


def serve(config: DecodeConfig, ready_file: str | None = None) -> int:
    """Run the decode service in this process until SIGTERM/SIGINT (see qwenpd.grpc_server.serve_main)."""
    set_neuron_cores(config.engine.neuron_cores)  # before anything starts the Neuron runtime in this process
    code = serve_main("decode", lambda on_ready: run(config, on_ready), ready_file)
    return 1 if rank_lost() else code
