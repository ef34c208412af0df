"""The failures a client sees: one exception class per status code, and the ONE function mapping a failed
call to them (`from_rpc_error`, shared with the servers' mapping in qwenpd.grpc_status, so both sides agree).

    InvalidArgument (.field)    the request is malformed; `field` names the bad field, e.g. "sampling.top_p"
    NotFound                    unknown or expired checkpoint
    FailedPrecondition          e.g. a checkpoint written for another model
    ResourceExhausted           a queue or budget is full (.retry_after_s)
    Unavailable                 a service is down or shutting down (.retry_after_s)
    DataLoss                    corrupt checkpoint bytes
    DeadlineExceeded, Cancelled the call's timeout passed / it was cancelled
    Unauthenticated (.reason)   no or a wrong bearer token (MISSING_TOKEN / BAD_TOKEN)
    RemoteError (.code)         any other status (INTERNAL, UNIMPLEMENTED, ...)
All derive from QwenpdError.
"""

from qwenpd.errors import (Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                           QwenpdError, RemoteError, ResourceExhausted, Unauthenticated, Unavailable)
from qwenpd.grpc_status import from_rpc_error

__all__ = ["Cancelled", "DataLoss", "DeadlineExceeded", "FailedPrecondition", "InvalidArgument", "NotFound",
           "QwenpdError", "RemoteError", "ResourceExhausted", "Unauthenticated", "Unavailable", "from_rpc_error"]
