"""The HTTP API's access log and request ids: an ASGI middleware around the whole app.

`X-Request-Id` is honoured when a caller sends a sane one (printable, at most 128 characters) and made otherwise;
it is echoed on the response and carried to the backend calls (prefill's request id is `<id>-<prompt index>`),
so one id follows a request through every service's logs. Once a response has been sent in full (a stream: its
last event), one line at INFO on the `qwenpd.access` logger: method, route, status, prompt and completion tokens,
time to first token, total seconds and the request id. Never the prompt or the output.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("qwenpd.access")

_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(slots=True)
class Access:
    """What a handler knows of its request, for the log line (`request.state.access`)."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None


class AccessLog:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        access = Access(given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex)
        scope.setdefault("state", {})["access"] = access
        status = 500
        logged = False

        def line() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            ttft = "-" if access.ttft_s is None else f"{access.ttft_s:.3f}"
            log.info("%s %s %d prompt_tokens=%d completion_tokens=%d ttft_s=%s total_s=%.3f request_id=%s",
                     scope.get("method", "-"), scope.get("path", "-"), status, access.prompt_tokens,
                     access.completion_tokens, ttft, time.monotonic() - started, access.request_id)

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", access.request_id.encode("latin-1"))]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                line()

        try:
            await self.app(scope, receive, sending)
        finally:
            line()  # once: the caller left mid-answer, or the app failed (the status sent, else 500)
