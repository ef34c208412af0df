"""Shared gRPC plumbing of the three services: domain errors and their ONE mapping to status codes (with
google.rpc rich details, both ways), and the grpc.aio server skeleton (health, reflection, graceful
SIGTERM/SIGINT shutdown, port 0 read back).

Service code raises `QwenpdError` subclasses and never touches status codes; `make_server` installs the
interceptor that turns them into statuses. Callers turn a failed call back into the same exceptions with
`from_rpc_error`.
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
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

log = logging.getLogger(__name__)

ERROR_DOMAIN = "qwenpd"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # control plane only: prompts and token lists, never tensors
DEFAULT_GRACE_S = 5.0


# ---- domain errors ---------------------------------------------------------------------------------------
class QwenpdError(Exception):
    """Base of every failure a caller can act on. Raise a subclass; each maps to one status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason  # google.rpc.ErrorInfo.reason, UPPER_SNAKE_CASE
        self.metadata = dict(metadata or {})

    def details(self) -> list[Any]:
        """google.rpc detail messages beyond ErrorInfo (overridden per kind)."""
        return []


class InvalidArgument(QwenpdError):
    """The request is malformed; `field` is its path in the request, e.g. "sampling.top_p"."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, **kw: Any):
        super().__init__(f"{field}: {message}" if field else message, **kw)
        self.field = field
        self.description = message

    def details(self) -> list[Any]:
        return [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)])]


class NotFound(QwenpdError):
    """A named thing (checkpoint, lease, ...) does not exist, or no longer does."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"

    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.resource_type = resource_type
        self.resource_name = resource_name

    def details(self) -> list[Any]:
        return [error_details_pb2.ResourceInfo(resource_type=self.resource_type, resource_name=self.resource_name,
                                               description=self.message)]


class FailedPrecondition(QwenpdError):
    """The request is valid but the system is not in a state to serve it (e.g. a model mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, subject: str = "", violation_type: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.subject = subject
        self.violation_type = violation_type or self.reason

    def details(self) -> list[Any]:
        return [error_details_pb2.PreconditionFailure(violations=[error_details_pb2.PreconditionFailure.Violation(
            type=self.violation_type, subject=self.subject, description=self.message)])]


class _Retryable(QwenpdError):
    """Failures where waiting may help: carries an optional retry hint and the exhausted resource."""

    def __init__(self, message: str, *, subject: str = "", retry_after_s: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.subject = subject
        self.retry_after_s = retry_after_s

    def details(self) -> list[Any]:
        out: list[Any] = [error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.message)])]
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            out.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return out


class ResourceExhausted(_Retryable):
    """A budget is full (cache bytes, queue slots); `retry_after_s` None = retrying will not help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(_Retryable):
    """The service is overloaded, shutting down, or a dependency is unreachable."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(QwenpdError):
    """Stored bytes are corrupt or truncated (checksum, structure)."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class DeadlineExceeded(QwenpdError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(QwenpdError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unauthenticated(QwenpdError):
    """The call carries no valid credentials (missing or wrong bearer token)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class RemoteError(QwenpdError):
    """A failed call whose status has no domain class here (INTERNAL, UNIMPLEMENTED, ...)."""

    def __init__(self, message: str, *, code: grpc.StatusCode, **kw: Any):
        super().__init__(message, **kw)
        self.code = code


_BY_CODE: dict[grpc.StatusCode, type[QwenpdError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable,
                              DataLoss, DeadlineExceeded, Cancelled, Unauthenticated)
}


# ---- the one mapping -------------------------------------------------------------------------------------
def to_status(exc: QwenpdError) -> grpc.Status:
    """A domain error as a status with rich details (ErrorInfo first, then the kind's own details)."""
    details = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata),
               *exc.details()]
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    code = getattr(code_pb2, exc.code.name)
    return rpc_status.to_status(status_pb2.Status(code=code, message=exc.message, details=packed))


def from_rpc_error(err: grpc.RpcError) -> QwenpdError:
    """A failed call (sync or aio) as the domain error it stands for; unknown codes become RemoteError."""
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    message: str = err.details() or code.name  # type: ignore[attr-defined]
    unpacked: dict[type, Any] = {}
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:  # mismatched status trailer: keep code and message only
        status = None
    if status is not None:
        for a in status.details:
            for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                        error_details_pb2.PreconditionFailure, error_details_pb2.QuotaFailure,
                        error_details_pb2.RetryInfo):
                if a.Is(cls.DESCRIPTOR):
                    msg = cls()
                    a.Unpack(msg)
                    unpacked[cls] = msg
    info = unpacked.get(error_details_pb2.ErrorInfo)
    kw: dict[str, Any] = {"reason": info.reason, "metadata": dict(info.metadata)} if info else {}
    retry = unpacked.get(error_details_pb2.RetryInfo)
    retry_after = retry.retry_delay.ToNanoseconds() / 1e9 if retry else None
    cls_for_code = _BY_CODE.get(code)
    if cls_for_code is InvalidArgument:
        bad = unpacked.get(error_details_pb2.BadRequest)
        if bad and bad.field_violations:
            v = bad.field_violations[0]
            return InvalidArgument(v.field, v.description, **kw)
        return InvalidArgument("", message, **kw)
    if cls_for_code is NotFound:
        res = unpacked.get(error_details_pb2.ResourceInfo)
        return NotFound(message, resource_type=res.resource_type if res else "",
                        resource_name=res.resource_name if res else "", **kw)
    if cls_for_code is FailedPrecondition:
        pre = unpacked.get(error_details_pb2.PreconditionFailure)
        v0 = pre.violations[0] if pre and pre.violations else None
        return FailedPrecondition(message, subject=v0.subject if v0 else "",
                                  violation_type=v0.type if v0 else "", **kw)
    if cls_for_code in (ResourceExhausted, Unavailable):
        quota = unpacked.get(error_details_pb2.QuotaFailure)
        subject = quota.violations[0].subject if quota and quota.violations else ""
        return cls_for_code(message, subject=subject, retry_after_s=retry_after, **kw)  # type: ignore[call-arg]
    if cls_for_code is not None:
        return cls_for_code(message, **kw)
    return RemoteError(message, code=code, **kw)


async def abort_with(context: grpc.aio.ServicerContext, exc: QwenpdError) -> None:
    """End the call with the status `exc` maps to (raises grpc's AbortError, as context.abort does)."""
    status = to_status(exc)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


OnStatus = Callable[[str, grpc.StatusCode], None]  # (full method path, final code) of every finished call


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies `to_status` to every handler: QwenpdError -> its status; anything else -> logged INTERNAL.
    `on_status` sees every call's final code (metrics)."""

    def __init__(self, on_status: OnStatus | None = None) -> None:
        self._cache: dict[str, grpc.RpcMethodHandler] = {}
        self._on_status = on_status or (lambda method, code: None)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        method = handler_call_details.method
        if method in self._cache:
            return self._cache[method]
        handler = await continuation(handler_call_details)
        wrapped = _wrap_handler(handler, method, self._on_status) if handler is not None else None
        if wrapped is not None:
            self._cache[method] = wrapped
        return wrapped


async def _map_exception(context: grpc.aio.ServicerContext, exc: Exception, method: str,
                         on_status: OnStatus) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # context.abort() called directly: its code is on the context
        on_status(method, _status_code(context.code()))
        raise exc
    if not isinstance(exc, QwenpdError):
        log.exception("unexpected error in %s", method)
        exc = QwenpdError(f"internal error in {method}: {type(exc).__name__}")
    on_status(method, exc.code)
    await abort_with(context, exc)


def _status_code(code: Any) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str, on_status: OnStatus) -> grpc.RpcMethodHandler:
    if handler.unary_unary or handler.stream_unary:
        behavior = handler.unary_unary or handler.stream_unary

        async def unary_response(request_or_iterator, context):
            try:
                response = await behavior(request_or_iterator, context)
            except asyncio.CancelledError:  # the caller left or its deadline passed
                on_status(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
                await _map_exception(context, exc, method, on_status)
            else:
                on_status(method, grpc.StatusCode.OK)
                return response

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary_response, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    behavior = handler.unary_stream or handler.stream_stream
    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    if inspect.isasyncgenfunction(behavior) or inspect.isasyncgenfunction(getattr(behavior, "__func__", None)):
        async def stream_response(request_or_iterator, context):
            try:
                async for item in behavior(request_or_iterator, context):
                    yield item
            except (asyncio.CancelledError, GeneratorExit):
                on_status(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # noqa: BLE001
                await _map_exception(context, exc, method, on_status)
            else:
                on_status(method, grpc.StatusCode.OK)
    else:  # a coroutine writing with context.write()
        async def stream_response(request_or_iterator, context):  # type: ignore[misc]
            try:
                result = await behavior(request_or_iterator, context)
            except asyncio.CancelledError:
                on_status(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # noqa: BLE001
                await _map_exception(context, exc, method, on_status)
            else:
                on_status(method, grpc.StatusCode.OK)
                return result
    return factory(stream_response, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


# ---- server skeleton -------------------------------------------------------------------------------------
def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


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
    from qwenpd import security as sec_mod  # imports this module: keep the dependency one-way at import time

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
