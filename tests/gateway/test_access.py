"""The HTTP API's access log and request ids (gateway/access.py), on a bare ASGI app."""

from __future__ import annotations

import asyncio
import logging

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from qwenpd.gateway.access import AccessLog


async def _answer(request: Request):
    access = request.state.access
    access.prompt_tokens, access.completion_tokens, access.ttft_s = 7, 3, 0.25
    return JSONResponse({"id": access.request_id, "secret": (await request.json())["prompt"]})


async def _stream(request: Request):
    async def body():
        yield b"data: 1\n\n"
        request.state.access.completion_tokens = 2
        yield b"data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


APP = AccessLog(Starlette(routes=[Route("/a", _answer, methods=["POST"]), Route("/s", _stream)]))


def _run(coro):
    return asyncio.run(coro)


async def _calls():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as c:
        given = await c.post("/a", json={"prompt": "top secret prompt"}, headers={"x-request-id": "req-42"})
        made = await c.post("/a", json={"prompt": "top secret prompt"})
        bad = await c.post("/a", json={"prompt": "x"}, headers={"x-request-id": "has space"})
        streamed = await c.get("/s", headers={"x-request-id": "s-1"})
        missing = await c.get("/nope")
    return given, made, bad, streamed, missing


def test_request_ids_are_honoured_or_made_and_every_request_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="qwenpd.access"):
        given, made, bad, streamed, missing = _run(_calls())
    assert given.headers["x-request-id"] == "req-42" and given.json()["id"] == "req-42"
    assert len(made.headers["x-request-id"]) == 32 and made.json()["id"] == made.headers["x-request-id"]
    assert bad.headers["x-request-id"] != "has space"  # not a sane id: a fresh one
    assert streamed.headers["x-request-id"] == "s-1" and missing.status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenpd.access"]
    assert len(lines) == 5
    assert lines[0].startswith("POST /a 200 prompt_tokens=7 completion_tokens=3 ttft_s=0.250 total_s=")
    assert lines[0].endswith("request_id=req-42")
    assert "completion_tokens=2" in lines[3] and lines[3].endswith("request_id=s-1")  # after the stream's end
    assert lines[4].startswith("GET /nope 404")
    assert not any("secret" in line for line in lines)  # never the prompt
