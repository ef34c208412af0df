"""The gRPC server skeleton every qwenpd service uses: `make_server` (the error-mapping interceptor first,
security, requests that do not parse refused, health, reflection, message limits, port 0 read back),
`GrpcServer` (start, graceful shutdown on SIGTERM/SIGINT), and `run_server` / `serve_main`, the one start-up of
the cache store, prefill, decode and the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

from qwenpd import security as sec_mod
from qwenpd.address import format_address, split_address
from qwenpd.errors import QwenpdError
from qwenpd.grpc_status import ErrorMappingInterceptor, OnStatus, RequestParsingInterceptor
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.service_config import DEFAULT_GRACE_S

log = logging.getLogger(__name__)


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        # our clients' keepalive pings (security.KEEPALIVE_OPTIONS: one after 20 s without data) are welcome;
        # gRPC's default (5 min) counts them as strikes and would end the connection with GOAWAY
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
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


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"  # what buf curl and newer grpcurl ask for


def enable_reflection(server: grpc.aio.Server, names: tuple[str, ...]) -> None:
    """Server reflection under both of its names: grpc.reflection.v1alpha (what grpcio-reflection ships) and
    grpc.reflection.v1 (the same messages and wire format under the package newer clients use), one servicer."""
    _register_reflection_v1_descriptors()
    servicer = reflection.aio.ReflectionServicer((*names, reflection.SERVICE_NAME, REFLECTION_V1))
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _register_reflection_v1_descriptors() -> None:
    """grpc/reflection/v1/reflection.proto in the default descriptor pool (v1alpha's, renamed), so reflection can
    describe its own v1 service too. Once per process."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(".grpc.reflection.v1alpha."):
                f.type_name = f.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
            method.output_type = method.output_type.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    pool.Add(proto)


def make_server(*servicers: Any, host: str = "127.0.0.1", port: int = 0,
                interceptors: Sequence[grpc.aio.ServerInterceptor] = (), options: Iterable[tuple[str, Any]] = (),
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: Any = None,
                on_status: OnStatus | None = None) -> GrpcServer:
    """Build a grpc.aio server serving `servicers` (instances of generated `*Servicer` classes) plus
    grpc.health.v1 and reflection, with the error-mapping interceptor first and the one refusing requests that do
    not parse (INVALID_ARGUMENT) last, inside the security checks. Call inside the event loop.

    security: a qwenpd.security.Security (TLS / mutual TLS port, bearer-token check); None = plaintext, open.
    on_status(method, code) is called once per finished call (metrics).
    port 0 binds a free port; the bound one is `GrpcServer.port`. Raises OSError if the address cannot be bound.
    """
    sec = security or sec_mod.Security()
    merged = dict(server_options(max_message_bytes))
    merged.update(dict(options))
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(on_status), *sec_mod.server_interceptors(sec),
                                           *interceptors, RequestParsingInterceptor()], options=list(merged.items()))
    names = []
    for servicer in servicers:
        add, full_name = _registration(servicer)
        add(servicer, server)
        names.append(full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (*names, health.SERVICE_NAME))
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


# ---- the one start-up sequence ---------------------------------------------------------------------------
OnReady = Callable[[GrpcServer, dict[str, str]], None]  # (started server, extra addresses such as {"http": ...})
Companion = Callable[[GrpcServer], contextlib.AbstractAsyncContextManager[dict[str, str]]]


async def run_server(servicer: Any, *, listen: str, security: Any, metrics: Any, metrics_port: int, grace_s: float,
                     on_ready: OnReady | None, describe: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     companion: Companion | None = None) -> None:
    """Serve `servicer` on `listen` until SIGTERM/SIGINT, then drain for `grace_s`: build the server (error
    mapping, security, message limit, health, reflection), start it, start the `companion` server if any (an
    async context manager run for the server's lifetime, yielding its addresses, e.g. the gateway's HTTP API),
    expose `metrics` (a qwenpd.metrics.Metrics) on `metrics_port` (0 = off), log `describe` with the bound
    addresses, and call `on_ready(server, companion addresses)`."""
    host, port = split_address(listen)
    server = make_server(servicer, host=host, port=port, security=security, max_message_bytes=max_message_bytes,
                         on_status=metrics.record)
    async with contextlib.AsyncExitStack() as stack:
        await server.start()
        extra = await stack.enter_async_context(companion(server)) if companion is not None else {}
        if metrics_port:
            metrics.serve(host, metrics_port)
        log.info("%s on %s%s", describe, server.address, "".join(f", {k} on {v}" for k, v in extra.items() if v))
        if on_ready is not None:
            on_ready(server, extra)
        await server.serve_until_signal(grace_s=grace_s)
        log.info("%s on %s stopped", describe, server.address)


def write_ready_file(path: str | None, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON to `path` atomically (nothing when path is None)."""
    if path is None:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(payload))
    os.replace(tmp, path)


def serve_main(role: str, run: Callable[[OnReady], Awaitable[None]], ready_file: str | None = None,
               ready_extra: dict[str, Any] | None = None) -> int:
    """The one entry point of every qwenpd server process: run `run(on_ready)` until it returns (after a
    signal). Once SERVING, prints "qwenpd ROLE serving on ADDRESS" and writes {"address", "pid", **ready_extra}
    to `ready_file`, so a parent that asked for port 0 learns the bound port. A failure to start (a dependency
    unreachable or refusing, the address taken) is one line on stderr and exit code 1, never a traceback."""
    def on_ready(server: GrpcServer, extra: dict[str, str]) -> None:
        write_ready_file(ready_file, {"address": server.address, "pid": os.getpid(), **(ready_extra or {}), **extra})
        also = "".join(f", {name} on {address}" for name, address in extra.items() if address)
        print(f"qwenpd {role} serving on {server.address}{also}", flush=True)

    try:
        asyncio.run(run(on_ready))
    except (QwenpdError, OSError) as exc:
        print(f"qwenpd {role}: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    return 0
