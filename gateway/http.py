"""The OpenAI-compatible HTTP API (Starlette on uvicorn, in the gateway's event loop): POST /v1/completions,
POST /v1/chat/completions, GET /v1/models, GET /health.

`stream: true` answers with server-sent events, one `data: {json}` per chunk, `data: [DONE]` last (with
stream_options.include_usage, a usage chunk with no choices before it). A client that disconnects cancels the
request (Starlette cancels a streaming response on http.disconnect; a whole answer being collected is watched
the same way), which cancels the decode calls and frees their slots. `Authorization: Bearer <token>` is required
when the gateway has a token (not for /health); the prefix-cache salt comes from the `X-Cache-Salt` header, else
from the body's `cache_salt` (never from `user`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from qwenpd.gateway.media import MediaFetcher
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwenpd.clients.chat_output import ChatOutput, merged
from qwenpd.errors import QwenpdError
from qwenpd.gateway import openai
from qwenpd.gateway.access import Access, AccessLog
from qwenpd.gateway.core import Choice, Gateway, collect, usage
from qwenpd.gateway.openai import ApiError, Parsed

log = logging.getLogger(__name__)

SALT_HEADER = "x-cache-salt"


def _error_response(err: ApiError) -> JSONResponse:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class HttpApi:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        c = gateway.config
        self.fetch = MediaFetcher(c.allowed_media_domains, c.allowed_local_media_path, c.max_message_bytes)
        token = gateway.config.security.token()
        self._expected = token.encode() if token else None
        self.created = int(time.time())  # the models' `created`: when this server started
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed}, middleware=[
            Middleware(AccessLog),
            *([Middleware(CORSMiddleware, allow_origins=list(gateway.config.cors_origins),
                          allow_methods=["GET", "POST"], allow_headers=["*"], expose_headers=["x-request-id"])]
              if gateway.config.cors_origins else [])])

    # ---- routes --------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        d = self.gateway.dispatcher
        body = {"prefill_up": d.prefill_pool.up_count(), "decode_up": d.decode_pool.up_count()}
        ok = self.gateway.serving
        self._count("/health", 200 if ok else 503)
        return JSONResponse({"status": "ok" if ok else "unavailable", **body}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            await self.gateway.get_model_info(10.0)
        except ApiError as err:
            return self._fail("/v1/models", err)
        except QwenpdError as exc:
            return self._fail("/v1/models", openai.api_error(exc))
        self._count("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [_model_json(name, self.created)
                                                        for name in self.gateway.model_names]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            await self._check_model(request.path_params["model_id"])
        except ApiError as err:
            return self._fail("/v1/models/{id}", err)
        except QwenpdError as exc:
            return self._fail("/v1/models/{id}", openai.api_error(exc))
        self._count("/v1/models/{id}", 200)
        return JSONResponse(_model_json(request.path_params["model_id"], self.created))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions", openai.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        defaults = self.gateway.config.template_defaults
        return await self._generate(request, "/v1/chat/completions",
                                    lambda body, salt: openai.parse_chat(body, salt, defaults,
                                                                         self.fetch.for_request()))

    # ---- the common path -----------------------------------------------------------------------------------------
    async def _generate(self, request: Request, route: str, parse) -> Response:
        parsed: Parsed | None = None
        try:
            self._authorize(request)
            body = await self._json(request)
            # in a worker thread: an image URL may be fetched (only where the operator allows: gateway/media.py)
            parsed = await asyncio.to_thread(parse, body, request.headers.get(SALT_HEADER))
            if parsed.model not in self.gateway.model_names:
                await self._check_model(parsed.model)
            for prompt in parsed.prompts:  # token ids: their count is known before any backend sees them
                if prompt.HasField("token_ids"):
                    self._check_context(parsed, len(prompt.token_ids.ids))
        except ApiError as err:
            return self._fail(route, err)
        except QwenpdError as exc:
            return self._fail(route, self._api_error(exc, parsed))
        access: Access = request.state.access
        request_id = ("chatcmpl-" if parsed.chat else "cmpl-") + access.request_id
        if parsed.stream:
            return await self._stream(route, parsed, request_id, access)
        try:
            choices = await _unless_disconnected(request, self._collect(parsed, access))
        except ApiError as err:
            return self._fail(route, err)
        except QwenpdError as exc:
            return self._fail(route, self._api_error(exc, parsed))
        if choices is None:  # the caller left: its decode calls are cancelled, nobody reads an answer
            self._count(route, 499)
            return Response(status_code=499)
        self._count(route, 200)
        totals = _usage(parsed, choices)
        access.prompt_tokens, access.completion_tokens = totals["prompt_tokens"], totals["completion_tokens"]
        access.ttft_s = choices[0][0].trace.ttft_s if choices else None
        return JSONResponse(openai.response(parsed, request_id, [c for c, _ in choices], totals))

    async def _collect(self, parsed: Parsed, access: Access) -> list[tuple[Choice, int]]:
        """Every choice of every prompt, run to the end: (choice, prompt index), in output order."""
        out: list[tuple[Choice, int]] = []
        for i, prompt in enumerate(parsed.prompts):
            prompt.request_id = f"{access.request_id}-{i}"
            group: dict[int, Choice] = {}
            async for choice, chunk in self.gateway.choices(prompt, parsed.n, self.gateway.config.timeout_s):
                if choice.index not in group:
                    self._check_context(parsed, usage(choice.trace).prompt_tokens)
                collect(choice, chunk)
                group[choice.index] = choice
            for j in range(parsed.n):
                c = group[j]
                c.index = i * parsed.n + j
                out.append((c, i))
        return out

    async def _stream(self, route: str, parsed: Parsed, request_id: str, access: Access) -> Response:
        """Start the first prompt before answering, so that a request refused at once (a full queue, no backend
        up, a bad prompt) still gets its proper status instead of a 200 with an error event."""
        events = self._events(parsed, request_id, access)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = b""
        except ApiError as err:
            return self._fail(route, err)
        except QwenpdError as exc:
            return self._fail(route, self._api_error(exc, parsed))

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first
                async for event in events:
                    yield event
            except ApiError as err:  # after the 200: the error as a last event, as OpenAI does
                yield _sse(err.body())
            except QwenpdError as exc:
                yield _sse(self._api_error(exc, parsed).body())
            finally:
                await events.aclose()
            yield b"data: [DONE]\n\n"

        self._count(route, 200)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, parsed: Parsed, request_id: str, access: Access) -> AsyncIterator[bytes]:
        totals = [0, 0, 0, 0]  # prompt, cached, completion, image tokens
        for i, prompt in enumerate(parsed.prompts):
            prompt.request_id = f"{access.request_id}-{i}"
            outputs: dict[int, ChatOutput] = {}  # chat: each choice's reasoning/content/tool-call parser
            called: set[int] = set()
            offsets: dict[int, int] = {}  # completions: characters of each choice's text sent so far
            async for choice, chunk in self.gateway.choices(prompt, parsed.n, self.gateway.config.timeout_s):
                index = i * parsed.n + choice.index
                first = index not in outputs
                if first:
                    self._check_context(parsed, usage(choice.trace).prompt_tokens)
                    outputs[index] = openai.chat_output(parsed, choice)
                    offsets[index] = 0
                    if parsed.echo is not None:  # the prompt first, then the output (prefill has answered)
                        echoed, lp = openai.echo_prefix(parsed, choice, i)
                        offsets[index] = len(echoed)
                        yield _sse(openai.echo_chunk(parsed, request_id, index, echoed, lp))
                text, reasoning, calls, finish = chunk.text, "", [], chunk.finish_reason
                if parsed.chat:  # the chunk's text, parsed: what is certain now (a tag's start waits for the rest)
                    delta = outputs[index].push(chunk.text)
                    if chunk.finish_reason is not None:
                        tail = outputs[index].finish()
                        delta.content += tail.content
                        delta.reasoning += tail.reasoning
                        delta.tool_calls += tail.tool_calls
                    limit = None if parsed.parallel_tool_calls else 1
                    calls = [t.to_openai() for t in merged(delta.tool_calls) if limit is None or t.index < limit]
                    if calls:
                        called.add(index)
                    text, reasoning = delta.content, delta.reasoning
                    finish = openai.tool_finish(chunk.finish_reason, index in called)
                if not (first or text or reasoning or calls or finish or parsed.logprobs):
                    continue  # nothing to say (text held back or mid-character)
                yield _sse(openai.stream_chunk(parsed, request_id, index, chunk.token_ids, text, chunk.logprobs,
                                               finish, first, reasoning, token_text=chunk.text, tool_calls=calls,
                                               top_logprobs=chunk.top_logprobs, token_bytes=chunk.token_bytes,
                                               text_offset=offsets[index]))
                offsets[index] += len(chunk.text)
                if chunk.finish_reason is not None:
                    u = usage(choice.trace)
                    if choice.index == 0:
                        totals[0] += u.prompt_tokens
                        totals[1] += u.cached_tokens
                        totals[3] += u.image_tokens
                    totals[2] += u.completion_tokens
                    access.prompt_tokens, access.completion_tokens = totals[0], totals[2]
                    if access.ttft_s is None:
                        access.ttft_s = choice.trace.ttft_s
        if parsed.include_usage:
            yield _sse(openai.usage_chunk(parsed, request_id, openai.usage_json(*totals)))

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        got = request.headers.get("authorization", "")
        if not got:
            raise ApiError(401, "this server requires 'Authorization: Bearer <token>'", "authentication_error",
                           code="missing_api_key")
        scheme, _, token = got.strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._expected):
            raise ApiError(401, "the bearer token is not valid", "authentication_error", code="invalid_api_key")

    def _check_context(self, parsed: Parsed, prompt_tokens: int) -> None:
        info = self.gateway.model_info
        if info is not None and info.max_context:
            openai.check_context(parsed, prompt_tokens, info.max_context)

    def _api_error(self, exc: QwenpdError, parsed: Parsed | None) -> ApiError:
        info = self.gateway.model_info
        return openai.api_error(exc, parsed, info.max_context if info is not None else None)

    async def _json(self, request: Request) -> Any:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":  # a form or text/plain post from another site's page is not a request
            raise ApiError(415, f"the request body must be application/json, got {kind or 'no content type'}",
                           code="unsupported_media_type")
        limit = self._body_limit()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def _body_limit(self) -> int:
        """The largest body worth reading: what the longest prompt that could fit the model's context takes in JSON
        (12 bytes a character at worst: a \\uXXXX surrogate pair), plus room for the other fields; never past
        --max-message-bytes. A model that takes images takes data URLs up to --max-message-bytes."""
        limit = self.gateway.config.max_message_bytes
        info = self.gateway.model_info
        if info is not None and info.max_prompt_chars and not info.vision:
            limit = min(limit, 12 * info.max_prompt_chars + (1 << 20))
        return limit

    async def _check_model(self, model: str) -> None:
        await self.gateway.get_model_info(10.0)
        if model not in self.gateway.model_names:
            served = ", ".join(f"'{name}'" for name in self.gateway.model_names)
            raise ApiError(404, f"the model '{model}' does not exist; this server serves {served}", param="model",
                           code="model_not_found")

    def _count(self, route: str, status: int) -> None:
        self.gateway.metrics.http_requests.labels(route, str(status)).inc()

    def _fail(self, route: str, err: ApiError) -> JSONResponse:
        self._count(route, err.status)
        return _error_response(err)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                        code="method_not_allowed"))


def _model_json(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "qwenpd"}


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Run `work` (a coroutine) unless the client disconnects first: then cancel it (which cancels its decode
    calls and frees their slots) and return None. Streaming responses get the same from Starlette."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    return task.result() if not task.cancelled() else None


def _usage(parsed: Parsed, choices: list[tuple[Choice, int]]) -> dict[str, Any]:
    prompt = cached = completion = images = 0
    for choice, _ in choices:
        u = usage(choice.trace)
        if choice.index % parsed.n == 0:
            prompt += u.prompt_tokens
            cached += u.cached_tokens
            images += u.image_tokens
        completion += u.completion_tokens
    return openai.usage_json(prompt, cached, completion, images)
