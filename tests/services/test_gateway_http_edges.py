"""The HTTP API's edges a browser or a model hub user meets (issue 21, items 3 and 10): POST bodies must be JSON
(a form post from another site's page is 415, not a request), CORS headers only for configured origins, and the
model under every name it is served as (GET /v1/models/{id})."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.services.gateway_proc import start_gateway


@pytest.fixture(scope="module")
def named(services, tmp_path_factory):
    g = start_gateway(tmp_path_factory.mktemp("gw-named"), [services.prefill], [services.decode],
                      "--served-model-name", "qwen-tiny", "org/qwen-tiny-v2", "--cors-origin", "https://app.example")
    yield g
    assert g.stop() == 0


def test_only_json_bodies_are_requests_and_no_cors_by_default(gateway):
    model = httpx.get(f"{gateway.base_url}/models").json()["data"][0]["id"]
    body = '{"model": "%s", "prompt": "hi", "max_tokens": 2}' % model
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        r = httpx.post(f"{gateway.base_url}/completions", content=body, headers=headers, timeout=60)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (kind, r.text)
    r = httpx.post(f"{gateway.base_url}/completions", content=body, timeout=60,
                   headers={"content-type": "application/json; charset=utf-8", "origin": "https://evil.example",
                            "x-request-id": "edge-1"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert r.headers["x-request-id"] == "edge-1" and r.json()["id"] == "cmpl-edge-1"  # one id end to end
    pre = httpx.options(f"{gateway.base_url}/completions", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_served_names_and_configured_origins(named):
    listed = httpx.get(f"{named.base_url}/models").json()["data"]
    assert [m["id"] for m in listed] == ["qwen-tiny", "org/qwen-tiny-v2"]
    assert httpx.get(f"{named.base_url}/models/org/qwen-tiny-v2").json()["id"] == "org/qwen-tiny-v2"
    missing = httpx.get(f"{named.base_url}/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    with openai.OpenAI(base_url=named.base_url, api_key="unused", max_retries=0, timeout=60) as oai:
        for name in ("qwen-tiny", "org/qwen-tiny-v2"):
            r = oai.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length")
        assert oai.models.retrieve("qwen-tiny").id == "qwen-tiny"
    pre = httpx.options(f"{named.base_url}/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{named.base_url}/completions", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"
