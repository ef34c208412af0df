"""The ONE mapping between domain errors (`qwenpd.errors`) and gRPC statuses, both ways, with google.rpc
rich details: `to_status` / `abort_with` and the server interceptor that applies them to every handler, the
interceptor that turns a request that does not parse into INVALID_ARGUMENT, and `from_rpc_error`, which turns a
failed call (sync or aio) back into the same exception class.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from qwenpd.errors import (BY_STATUS, ERROR_DOMAIN, FailedPrecondition, InvalidArgument, NotFound, QwenpdError,
                           RemoteError, ResourceExhausted, RetryableError, Unavailable)

log = logging.getLogger(__name__)


def _details(exc: QwenpdError) -> list[Any]:
    """The google.rpc detail messages of an error beyond ErrorInfo (by kind)."""
    if isinstance(exc, InvalidArgument):
        return [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)])]
    if isinstance(exc, NotFound):
        return [error_details_pb2.ResourceInfo(resource_type=exc.resource_type, resource_name=exc.resource_name,
                                               description=exc.message)]
    if isinstance(exc, FailedPrecondition):
        return [error_details_pb2.PreconditionFailure(violations=[error_details_pb2.PreconditionFailure.Violation(
            type=exc.violation_type, subject=exc.subject, description=exc.message)])]
    if isinstance(exc, RetryableError):
        out: list[Any] = []
        if isinstance(exc, ResourceExhausted):  # a quota ran out; an outage (Unavailable) is no quota's failure
            out.append(error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=exc.subject, description=exc.message)]))
        if exc.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
            out.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return out
    return []


def to_status(exc: QwenpdError) -> grpc.Status:
    """A domain error as a status with rich details (ErrorInfo first, then the kind's own details)."""
    details = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata),
               *_details(exc)]
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    code = getattr(code_pb2, exc.status)
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
    cls_for_code = BY_STATUS.get(code.name)
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
    on_status(method, grpc.StatusCode[exc.status])
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


# ---- requests that do not parse -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Unparsable:
    """What a guarded deserializer hands on instead of a message: the bytes were not a valid `type_name`."""

    type_name: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument("", f"the request is not a valid {self.type_name} message: {self.reason}",
                               reason="MALFORMED_REQUEST")


class LogThrottle:
    """At most one log line per `every_s` seconds; the next line counts the ones left out in between."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self._clock = every_s, clock
        self._next = float("-inf")
        self._skipped = 0

    def warning(self, message: str) -> None:
        now = self._clock()
        if now < self._next:
            self._skipped += 1
            return
        more = f" ({self._skipped} more since the last such line)" if self._skipped else ""
        log.warning("%s%s", message, more)
        self._next, self._skipped = now + self.every_s, 0


class RequestParsingInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse as the method's message (bad UTF-8 in a string field, truncated or garbage
    bytes) end the call with INVALID_ARGUMENT naming the message type, logged as one throttled WARNING line;
    grpc's own answer is UNKNOWN with the exception's class and a traceback per call. Install it innermost: the
    check runs inside the call, after the interceptors outside it (the bearer token is checked first)."""

    def __init__(self, throttle: LogThrottle | None = None) -> None:
        self._throttle = throttle or LogThrottle()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _parsed(handler, _guarded(handler.request_deserializer, handler_call_details.method, self._throttle))


def _guarded(deserialize: Callable[[bytes], Any], method: str, throttle: LogThrottle) -> Callable[[bytes], Any]:
    """`deserialize`, returning an Unparsable where it raises DecodeError (the call fails inside, mapped)."""
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "") or "request"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            # upb: "Error parsing message with type 'qwenpd.v1.X': String field had bad UTF-8"
            reason = str(exc).rpartition("': ")[2] or "cannot be parsed"
            throttle.warning(f"malformed request to {method}: not a valid {type_name} ({reason})")
            return Unparsable(type_name, reason)

    return parse


def _parsed(handler: grpc.RpcMethodHandler, deserialize: Callable[[bytes], Any]) -> grpc.RpcMethodHandler:
    """`handler` reading its requests through `deserialize`, refusing an Unparsable one with its error."""

    def checked(request: Any) -> Any:
        if isinstance(request, Unparsable):
            raise request.error()
        return request

    async def each_checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            yield checked(request)

    read = each_checked if handler.request_streaming else checked
    return with_before(handler, lambda request, context: read(request), deserialize)


def with_before(handler: grpc.RpcMethodHandler, before: Callable[[Any, Any], Any],
                deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """`handler` (an aio one, any of the four kinds) whose behaviour gets before(request, context) instead of the
    request: a check that hands the request on, or the request (stream) made from it; read with `deserializer`
    where given. What server interceptors that act per call return."""
    kw = dict(request_deserializer=deserializer or handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary or handler.stream_unary:
        behavior = handler.unary_unary or handler.stream_unary

        async def unary(request, context):
            return await behavior(before(request, context), context)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary, **kw)
    behavior = handler.unary_stream or handler.stream_stream

    async def stream(request, context):
        result = behavior(before(request, context), context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:  # a coroutine writing with context.write()
            await result

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(stream, **kw)
