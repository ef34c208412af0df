"""The failures a caller can act on: one exception class per kind, plain Python (no grpc import).

Service and bookkeeping code raises these and never touches status codes; `qwenpd.grpc_status` is the ONE
mapping between them and gRPC statuses (with google.rpc rich details, both ways). Each class names its status
by its canonical code name (`status = "NOT_FOUND"`); `.code` gives the matching `grpc.StatusCode` for callers
that compare against grpc's enum (grpc is imported only when `.code` is read).
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_DOMAIN = "qwenpd"  # google.rpc.ErrorInfo.domain of every error we send


class QwenpdError(Exception):
    """Base of every failure a caller can act on. Raise a subclass; each maps to one status code."""

    status: ClassVar[str] = "INTERNAL"  # canonical gRPC / google.rpc code name
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason  # google.rpc.ErrorInfo.reason, UPPER_SNAKE_CASE
        self.metadata = dict(metadata or {})

    @property
    def code(self) -> Any:
        """The grpc.StatusCode of this error."""
        import grpc

        return grpc.StatusCode[self.status]


class InvalidArgument(QwenpdError):
    """The request is malformed; `field` is its path in the request, e.g. "sampling.top_p"."""

    status = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, **kw: Any):
        super().__init__(f"{field}: {message}" if field else message, **kw)
        self.field = field
        self.description = message


class NotFound(QwenpdError):
    """A named thing (checkpoint, lease, ...) does not exist, or no longer does."""

    status = "NOT_FOUND"
    default_reason = "NOT_FOUND"

    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.resource_type = resource_type
        self.resource_name = resource_name


class FailedPrecondition(QwenpdError):
    """The request is valid but the system is not in a state to serve it (e.g. a model mismatch)."""

    status = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, subject: str = "", violation_type: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.subject = subject
        self.violation_type = violation_type or self.reason


class RetryableError(QwenpdError):
    """Failures where waiting may help: carries an optional retry hint and the exhausted resource."""

    def __init__(self, message: str, *, subject: str = "", retry_after_s: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.subject = subject
        self.retry_after_s = retry_after_s


class ResourceExhausted(RetryableError):
    """A budget is full (cache bytes, queue slots); `retry_after_s` None = retrying will not help."""

    status = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(RetryableError):
    """The service is overloaded, shutting down, or a dependency is unreachable."""

    status = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class DataLoss(QwenpdError):
    """Stored bytes are corrupt or truncated (checksum, structure)."""

    status = "DATA_LOSS"
    default_reason = "DATA_LOSS"


class DeadlineExceeded(QwenpdError):
    status = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(QwenpdError):
    status = "CANCELLED"
    default_reason = "CANCELLED"


class Unauthenticated(QwenpdError):
    """The call carries no valid credentials (missing or wrong bearer token)."""

    status = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class RemoteError(QwenpdError):
    """A failed call whose status has no domain class here (INTERNAL, UNIMPLEMENTED, ...); `.code` is the
    grpc.StatusCode it came with."""

    def __init__(self, message: str, *, code: Any, **kw: Any):
        super().__init__(message, **kw)
        self._code = code
        self.status = getattr(code, "name", "UNKNOWN")  # type: ignore[misc]

    @property
    def code(self) -> Any:
        return self._code


# Every kind with its own status, by code name (the mapping's table).
BY_STATUS: dict[str, type[QwenpdError]] = {
    cls.status: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable,
                                DataLoss, DeadlineExceeded, Cancelled, Unauthenticated)
}
