"""Run the encoder service: load the vision tower, connect to the cache store, serve until SIGTERM/SIGINT."""

from __future__ import annotations

from qwenpd.cache_store.client import CacheStoreClient
from qwenpd.encoder_service.config import EncoderConfig
from qwenpd.encoder_service.service import EncoderServicer, Worker
from qwenpd.engine.vision import VisionModel
from qwenpd.grpc_server import OnReady, run_server, serve_main
from qwenpd.metrics import EncoderMetrics


def load_model(config: EncoderConfig) -> VisionModel:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    return VisionModel(config.model_dir, config.dtype, config.device)


async def run(config: EncoderConfig, on_ready: OnReady | None = None) -> None:
    worker = Worker(config.max_queue)
    store = CacheStoreClient(config.cache, security=config.security)
    metrics = EncoderMetrics()
    try:
        store.info()  # fail at start if the store is unreachable
        model = await worker.run(lambda: load_model(config))  # on the worker thread, like every call
        await run_server(EncoderServicer(model, config, store, worker, metrics), listen=config.listen,
                         security=config.security, metrics=metrics, metrics_port=config.metrics_port,
                         grace_s=config.grace_s, on_ready=on_ready, max_message_bytes=config.limits.max_message_bytes,
                         describe=f"encoder ({model.fingerprint[:16]}, {model.dtype}, {model.device}; cache store "
                                  f"{config.cache})")
    finally:
        worker.shutdown()
        metrics.close()
        store.close()


def serve(config: EncoderConfig, ready_file: str | None = None) -> int:
    """Run the encoder service in this process until SIGTERM/SIGINT (see qwenpd.grpc_server.serve_main)."""
    return serve_main("encoder", lambda on_ready: run(config, on_ready), ready_file)
