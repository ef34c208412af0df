"""The gRPC server skeleton every qwenpd service uses: `make_server` (the error-mapping interceptor first,
security, health, reflection, message limits, port 0 read back), `GrpcServer` (start, graceful shutdown on
SIGTERM/SIGINT) and `run_server`, the one start-up sequence of the cache store, prefill and decode servers.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qwenpd import security as sec_mod
from qwenpd.address import format_address
from qwenpd.grpc_status import ErrorMappingInterceptor, OnStatus
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 5.0


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ]


@dataclass(slots=True)
class GrpcServer:
    """A built (not yet started) grpc.aio server with health and reflection, bound to `port`."""

    server: grpc.aio.Server
    health: Any  # grpc_health.v1 aio HealthServicer
    host: str
    port: int
    service_names: tuple[str, ...]
    _stopping: bool = field(default=False, init=False)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    async def start(self) -> None:
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, grace_s: float = DEFAULT_GRACE_S, drain_delay_s: float = 0.0) -> None:
        """Health NOT_SERVING, optionally wait for routers to notice, stop accepting, drain in-flight calls."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if drain_delay_s > 0:
            await asyncio.sleep(drain_delay_s)
        await self.server.stop(grace_s)

    async def serve_until_signal(self, grace_s: float = DEFAULT_GRACE_S, drain_delay_s: float = 0.0,
                                 on_shutdown: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Run until SIGTERM/SIGINT, then shut down gracefully and call on_shutdown."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        await self.shutdown(grace_s, drain_delay_s)
        if on_shutdown is not None:
            result = on_shutdown()
            if inspect.isawaitable(result):
                await result


def make_server(*servicers: Any, host: str = "127.0.0.1", port: int = 0,
                interceptors: Sequence[grpc.aio.ServerInterceptor] = (), options: Iterable[tuple[str, Any]] = (),
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: Any = None,
                on_status: OnStatus | None = None) -> GrpcServer:
    """Build a grpc.aio server serving `servicers` (instances of generated `*Servicer` classes) plus
    grpc.health.v1 and reflection, with the error-mapping interceptor first. Call inside the event loop.

    security: a qwenpd.security.Security (TLS / mutual TLS port, bearer-token check); None = plaintext, open.
    on_status(method, code) is called once per finished call (metrics).
    port 0 binds a free port; the bound one is `GrpcServer.port`. Raises OSError if the address cannot be bound.
    """
    sec = security or sec_mod.Security()
    merged = dict(server_options(max_message_bytes))
    merged.update(dict(options))
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(on_status), *sec_mod.server_interceptors(sec),
                                           *interceptors], options=list(merged.items()))
    names = []
    for servicer in servicers:
        add, full_name = _registration(servicer)
        add(servicer, server)
        names.append(full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = format_address(host, port)
    try:
        creds = sec_mod.server_credentials(sec)
        bound = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    return GrpcServer(server, health_servicer, host, bound, tuple(names))


def _registration(servicer: Any) -> tuple[Callable[[Any, Any], None], str]:
    """The generated add_*_to_server function and full service name of a servicer instance."""
    for base in type(servicer).__mro__:
        module_name, cls_name = base.__module__, base.__name__
        if module_name.endswith("_pb2_grpc") and cls_name.endswith("Servicer"):
            module = importlib.import_module(module_name)
            pb2 = importlib.import_module(module_name[: -len("_grpc")])
            service = cls_name[: -len("Servicer")]
            return getattr(module, f"add_{cls_name}_to_server"), pb2.DESCRIPTOR.services_by_name[service].full_name
    raise TypeError(f"{type(servicer).__name__} does not subclass a generated *Servicer class")
