"""Run the gateway: the gRPC GenerateService and the OpenAI-compatible HTTP API in one event loop, until
SIGTERM/SIGINT (then both stop taking calls and in-flight ones may finish within the grace period)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

from qwenpd.address import format_address, split_address
from qwenpd.gateway.config import GatewayConfig
from qwenpd.gateway.core import Gateway
from qwenpd.gateway.grpc_service import GenerateServicer
from qwenpd.gateway.http import HttpApi
from qwenpd.gateway.metrics import GatewayMetrics
from qwenpd.grpc_server import GrpcServer, OnReady, run_server, serve_main

log = logging.getLogger(__name__)


class _Uvicorn:
    """uvicorn on a socket we bound (port 0 read back), without its own signal handling (ours stops it)."""

    def __init__(self, app, config: GatewayConfig):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the gateway's handler stops both servers
                yield

        host, port = split_address(config.http_listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.address = format_address(host, self.sock.getsockname()[1])
        sec = config.security
        tls: dict = {}
        if sec.tls_cert is not None:
            tls = dict(ssl_certfile=sec.tls_cert, ssl_keyfile=sec.tls_key, ssl_ca_certs=sec.tls_ca,
                       ssl_cert_reqs=ssl.CERT_REQUIRED if sec.client_auth else ssl.CERT_NONE)
        self.server = Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                            timeout_graceful_shutdown=int(config.grace_s) or None, **tls))
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))

    async def wait_started(self) -> None:
        while not self.server.started:
            if self.task is not None and self.task.done():
                self.task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close()


async def run(config: GatewayConfig, on_ready: OnReady | None = None) -> None:
    """Serve until SIGTERM/SIGINT; on_ready(grpc_server, {"http": address or ""}) once both serve."""
    metrics = GatewayMetrics()
    gateway = Gateway(config, metrics)

    @contextlib.asynccontextmanager
    async def companion(server: GrpcServer) -> AsyncIterator[dict[str, str]]:
        await gateway.serve_health(server.health, ("", *server.service_names))  # the pools', not the process's
        if not config.http_listen:
            yield {"http": ""}
            return
        http = _Uvicorn(HttpApi(gateway).app, config)
        http.start()
        try:
            await http.wait_started()
            yield {"http": http.address}
        finally:
            await http.stop()

    try:
        await gateway.start()
        await run_server(GenerateServicer(gateway), listen=config.listen, security=config.security, metrics=metrics,
                         metrics_port=config.metrics_port, grace_s=config.grace_s, on_ready=on_ready,
                         max_message_bytes=config.max_message_bytes, companion=companion,
                         describe=f"gateway (prefill {','.join(config.prefill)}, decode {','.join(config.decode)})")
    finally:
        await gateway.stop()
        metrics.close()


def serve(config: GatewayConfig, ready_file: str | None = None) -> int:
    """Run the gateway in this process until SIGTERM/SIGINT (see qwenpd.grpc_server.serve_main)."""
    return serve_main("gateway", lambda on_ready: run(config, on_ready), ready_file)
