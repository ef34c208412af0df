"""Run the gateway: the gRPC GenerateService and the OpenAI-compatible HTTP API in one event loop, until
SIGTERM/SIGINT (then both stop taking calls and in-flight ones may finish within the grace period)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator

from qwenpd.address import format_address, split_address
from qwenpd.gateway.config import GatewayConfig
from qwenpd.gateway.core import Gateway
from qwenpd.gateway.grpc_service import GenerateServicer
from qwenpd.gateway.http import HttpApi
from qwenpd.gateway.metrics import GatewayMetrics
from qwenpd.grpc_server import GrpcServer, make_server

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


async def run(config: GatewayConfig, on_ready: Callable[[GrpcServer, str], None] | None = None) -> None:
    """on_ready(grpc_server, http_address or "") once both serve."""
    metrics = GatewayMetrics()
    gateway = Gateway(config, metrics)
    http: _Uvicorn | None = None
    try:
        await gateway.start()
        host, port = split_address(config.listen)
        server = make_server(GenerateServicer(gateway), host=host, port=port, security=config.security,
                             max_message_bytes=config.max_message_bytes, on_status=metrics.record)
        await server.start()
        if config.http_listen:
            http = _Uvicorn(HttpApi(gateway).app, config)
            http.start()
            await http.wait_started()
        if config.metrics_port:
            metrics.serve(host, config.metrics_port)
        log.info("gateway on %s (HTTP %s): prefill %s, decode %s", server.address, http.address if http else "off",
                 ",".join(config.prefill), ",".join(config.decode))
        if on_ready is not None:
            on_ready(server, http.address if http else "")
        await server.serve_until_signal(grace_s=config.grace_s)
    finally:
        if http is not None:
            await http.stop()
        await gateway.stop()
        metrics.close()


def serve(config: GatewayConfig, on_ready: Callable[[GrpcServer, str], None] | None = None) -> int:
    asyncio.run(run(config, on_ready))
    return 0
