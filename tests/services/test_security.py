"""TLS, mutual TLS and the bearer token through real processes: `serve all` with mTLS + token serves a client
that has both; a plaintext client, a client without a certificate, one that does not trust the server, and
calls without or with a wrong token are refused; health checks stay open. Plain TLS (no client certificates)
on a cache store of its own. Everything listens on 127.0.0.1 by default."""

from __future__ import annotations

import json
import os
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenpd.clients import Client, Security, Unauthenticated, Unavailable
from qwenpd.security import channel
from tests.services.certs import make_pki
from tests.services.conftest import qwenpd_cmd, segments, start_serve_all, stop_serve_all, wait_ready_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    p = make_pki(d)
    p.token = d / "token"
    p.token.write_text("s3cret-token\n")
    p.wrong_token = d / "wrong"
    p.wrong_token.write_text("not-the-token\n")
    return p


@pytest.fixture(scope="module")
def secure(tiny_model_dir, tmp_path_factory, pki):
    s = start_serve_all(tiny_model_dir, tmp_path_factory.mktemp("secure"), f"sec{os.getpid()}",
                        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca),
                        "--tls-client-auth", "--auth-token-file", str(pki.token))
    yield s
    assert stop_serve_all(s) == 0
    assert segments(s.store_id) == []


def _client_security(pki, **overrides) -> Security:
    kw = dict(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key),
              auth_token_file=str(pki.token))
    kw.update(overrides)
    return Security(**kw)


def test_defaults_listen_on_loopback():
    from qwenpd.cache_store.config import CacheStoreConfig
    from qwenpd.supervisor import ServiceSet
    from qwenpd.decode_service.config import DecodeConfig
    from qwenpd.prefill_service.config import PrefillConfig

    assert CacheStoreConfig().host == "127.0.0.1"
    for cls in (PrefillConfig, DecodeConfig):
        assert cls.__dataclass_fields__["listen"].default.startswith("127.0.0.1:")
    import inspect

    assert inspect.signature(ServiceSet.build).parameters["host"].default == "127.0.0.1"


def test_mtls_and_token_end_to_end(secure, pki):
    with Client(prefill=secure.prefill, decode=secure.decode, timeout=60, security=_client_security(pki)) as c:
        r = c.generate("over TLS", max_tokens=4, temperature=0, ignore_eos=True)
    assert len(r.token_ids) == 4 and r.finish_reason == "length"


def test_cli_generate_with_tls_flags(secure, pki):
    out = subprocess.run(qwenpd_cmd("generate", "--prefill", secure.prefill, "--decode", secure.decode,
                                    "--prompt", "hi", "--max-tokens", "3", "--temperature", "0", "--ignore-eos",
                                    "--json", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                                    "--tls-key", str(pki.client_key), "--auth-token-file", str(pki.token)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout.splitlines()[-1])["token_ids"]) == 3


@pytest.mark.parametrize("security", ["plaintext", "no-client-cert", "untrusted-server"])
def test_transport_refused(secure, pki, security):
    sec = {"plaintext": Security(auth_token_file=str(pki.token)),
           "no-client-cert": _client_security(pki, tls_cert=None, tls_key=None),
           "untrusted-server": _client_security(pki, tls_ca=str(pki.other_ca))}[security]
    with Client(prefill=secure.prefill, decode=secure.decode, timeout=5, security=sec) as c:
        with pytest.raises(Unavailable):
            c.generate("refused", max_tokens=2)


@pytest.mark.parametrize("token", ["missing", "wrong"])
def test_token_required_on_every_service(secure, pki, token):
    from qwenpd.cache_store.client import CacheStoreClient

    sec = _client_security(pki, auth_token_file=None if token == "missing" else str(pki.wrong_token))
    with Client(prefill=secure.prefill, decode=secure.decode, timeout=10, security=sec) as c:
        with pytest.raises(Unauthenticated) as info:
            c.generate("no entry", max_tokens=2)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.reason == ("MISSING_TOKEN" if token == "missing" else "BAD_TOKEN")
        with pytest.raises(Unauthenticated):
            c.load(secure.decode)
    with CacheStoreClient(secure.cache, security=sec, timeout_s=10) as store, pytest.raises(Unauthenticated):
        store.stats()


def test_health_stays_open_without_token(secure, pki):
    sec = _client_security(pki, auth_token_file=None)
    for address in (secure.cache, secure.prefill, secure.decode):
        with channel(address, sec) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_plain_tls_cache_store(tmp_path, pki):
    """TLS without client certificates: a client that trusts the CA gets in; a plaintext one does not."""
    from qwenpd.cache_store.client import CacheStoreClient
    from qwenpd.errors import Unavailable as StoreUnavailable

    ready = tmp_path / "store.json"
    proc = subprocess.Popen(qwenpd_cmd("serve", "cache", "--store-id", f"tls{os.getpid()}", "--ready-file",
                                       str(ready), "--log-level", "WARNING", "--tls-cert", str(pki.server_cert),
                                       "--tls-key", str(pki.server_key)))
    try:
        address = wait_ready_file(ready, proc)["address"]
        with CacheStoreClient(address, security=Security(tls_ca=str(pki.ca)), timeout_s=10) as store:
            assert store.stats().entries == 0
        with CacheStoreClient(address, timeout_s=5) as store, pytest.raises(StoreUnavailable):
            store.stats()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_checkpoint_ids_are_128_bit_random(services, store):
    """Hand-off checkpoint ids are 32 hex digits from `secrets` (cache_store.index), unrelated to the content:
    the same prompt twice gets unrelated ids. (Segment files: 0600, random names, see
    tests/cache_store/test_service.py and test_store.py.)"""
    import re

    from qwenpd.protos.qwenpd.v1 import prefill_pb2, prefill_pb2_grpc

    with grpc.insecure_channel(services.prefill) as ch:
        stub = prefill_pb2_grpc.PrefillServiceStub(ch)
        ids = [stub.Prefill(prefill_pb2.PrefillRequest(text="same prompt"), timeout=30).checkpoint_id
               for _ in range(2)]
    for checkpoint_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", checkpoint_id)
        store.delete(checkpoint_id)
    assert ids[0] != ids[1]


def test_gateway_over_mtls_with_token(secure, pki):
    """serve all's gateway speaks the same TLS and token as the services: gRPC Generate and HTTPS, both ways."""
    import httpx

    from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc

    request = generate_pb2.GenerateRequest(text="through the gateway", sampling=common_pb2.SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True))
    with channel(secure.gateway, _client_security(pki), aio=False) as ch:
        chunks = list(generate_pb2_grpc.GenerateServiceStub(ch).Generate(request, timeout=60))
    assert sum(len(c.token_ids) for c in chunks) == 3
    import ssl

    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with httpx.Client(base_url=f"https://{secure.http}", verify=context, timeout=60) as h:
        assert h.get("/v1/models").status_code == 401
        r = h.get("/v1/models", headers={"authorization": "Bearer s3cret-token"})
        assert r.status_code == 200, r.text
        model = r.json()["data"][0]["id"]
        r = h.post("/v1/completions", headers={"authorization": "Bearer s3cret-token"},
                   json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(httpx.HTTPError):  # no client certificate: the TLS handshake fails
        httpx.get(f"https://{secure.http}/health", verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=10)
