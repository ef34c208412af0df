"""Transport security and authentication of every qwenpd connection, in one place: TLS / mutual TLS credentials
for servers and channels, the bearer-token check on servers and the token sent by clients.

    server:  make_server(..., security=sec)             # TLS if sec.tls_cert, token check if sec.auth_token_file
    client:  channel(address, sec, options, aio=True)   # TLS if sec.tls_ca, sends `authorization: Bearer <token>`

One `Security` describes a process's identity both ways: a service presents `tls_cert`/`tls_key` to its callers
and, with mutual TLS, the same pair to the cache store it calls; `tls_ca` verifies the other side. The token
file holds one line; every service of a deployment shares it. Health checks stay open (load balancers and the
supervisor probe them without credentials); everything else, reflection included, needs the token.
"""

from __future__ import annotations

import argparse
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from qwenpd.errors import Unauthenticated
from qwenpd.grpc_status import with_before

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(slots=True, frozen=True)
class Security:
    """tls_cert/tls_key: this side's PEM certificate and key (a server's identity; a client's with mutual TLS).
    tls_ca: PEM CA bundle that verifies the peer (a client: the server; a server with client_auth: clients).
    client_auth: a server requires and verifies client certificates against tls_ca. auth_token_file: a file
    holding the bearer token that servers require and clients send."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    client_auth: bool = False
    auth_token_file: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.client_auth and not (self.tls_cert and self.tls_ca):
            raise ValueError("--tls-client-auth needs --tls-cert, --tls-key and --tls-ca")
        for name in ("tls_cert", "tls_key", "tls_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path!r} is not a file")
        if self.auth_token_file is not None and not self.token():
            raise ValueError(f"auth_token_file {self.auth_token_file!r} is empty")

    @property
    def tls(self) -> bool:
        """Whether a client of this config connects with TLS: a CA to verify the server (without one, the
        system's roots) or a certificate of its own is given."""
        return self.tls_ca is not None or self.tls_cert is not None

    def token(self) -> str | None:
        if self.auth_token_file is None:
            return None
        return Path(self.auth_token_file).read_text().strip()



def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


# ---- command line ----------------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser, server: bool = True) -> None:
    """--tls-cert/--tls-key/--tls-ca/--auth-token-file (+ --tls-client-auth on servers)."""
    who = "this server's" if server else "the client's (mutual TLS)"
    p.add_argument("--tls-cert", default=None, help=f"PEM certificate: {who} identity (turns TLS on)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle that verifies the peer" +
                   (" (clients with --tls-client-auth, and the cache store this service calls)" if server else
                    " (turns TLS on)"))
    if server:
        p.add_argument("--tls-client-auth", action="store_true",
                       help="mutual TLS: require client certificates signed by --tls-ca")
    p.add_argument("--auth-token-file", default=None,
                   help="file with the bearer token " + ("callers must send" if server else "to send"))


def from_args(args: argparse.Namespace) -> Security:
    return Security(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
                    client_auth=getattr(args, "tls_client_auth", False), auth_token_file=args.auth_token_file)


# ---- server side -----------------------------------------------------------------------------------------------
def server_credentials(sec: Security) -> grpc.ServerCredentials | None:
    """TLS credentials of a server (None = plaintext)."""
    if sec.tls_cert is None:
        return None
    pair = [(_read(sec.tls_key), _read(sec.tls_cert))]
    return grpc.ssl_server_credentials(pair, root_certificates=_read(sec.tls_ca) if sec.client_auth else None,
                                       require_client_auth=sec.client_auth)


def server_interceptors(sec: Security) -> list[grpc.aio.ServerInterceptor]:
    token = sec.token()
    return [] if token is None else [BearerTokenInterceptor(token)]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call's `authorization` metadata is `Bearer <token>` (constant-time compare).

    The check runs inside each call (the handler is wrapped), so handler caching by outer interceptors can
    never let an unauthenticated call through."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        return _checked(handler, self._check)

    def _check(self, context: grpc.aio.ServicerContext) -> None:
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if not got:
            raise Unauthenticated("this service requires `authorization: Bearer <token>` metadata",
                                  reason="MISSING_TOKEN")
        if not hmac.compare_digest(got_b, self._expected):
            raise Unauthenticated("the bearer token is not valid", reason="BAD_TOKEN")


def _checked(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    """`handler` that runs check(context) before anything else of a call."""
    def before(request, context):
        check(context)
        return request

    return with_before(handler, before)


# ---- client side -----------------------------------------------------------------------------------------------
def channel_credentials(sec: Security) -> grpc.ChannelCredentials | None:
    """TLS credentials of a channel (None = plaintext): verify the server with tls_ca, present tls_cert."""
    if not sec.tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(sec.tls_ca), private_key=_read(sec.tls_key),
                                        certificate_chain=_read(sec.tls_cert))


def _with_token(metadata: Any, token: str) -> list[tuple[str, Any]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


def _aio_details(d: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(d.method, d.timeout, _with_token(d.metadata, token), d.credentials,
                                      d.wait_for_ready)


# grpc.aio files each interceptor under the first call kind it implements: one class per kind
class _AioUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details, self.token), request)


class _AioStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details, self.token), request)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, d: grpc.ClientCallDetails, metadata: list[tuple[str, Any]]):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_SyncDetails(client_call_details, _with_token(client_call_details.metadata, self.token)),
                            request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_SyncDetails(client_call_details, _with_token(client_call_details.metadata, self.token)),
                            request)


# gRPC's default reconnect backoff starts at 1 s and grows to 120 s: a backend back after an outage (a restarted
# decode service, 5 s) would stay unreachable for seconds to minutes while its health checks fail at once on the
# waiting channel. Ours reconnect at most a second apart (the gateway's health interval); a refused connect to
# one address costs next to nothing. (grpc.min_reconnect_backoff_ms is left alone: despite its name it is the
# connect attempt's minimum timeout, 20 s.)
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))

# A peer that hangs (a frozen process: the kernel keeps its connection open) answers nothing and closes nothing, so
# a call to it waits for its deadline. Keepalive pings on a connection with calls in flight find that out: a ping
# unanswered for 10 s closes the transport and its calls fail with UNAVAILABLE (the dispatcher then retries or
# resumes them elsewhere). grpc 1.85 times a keepalive ping out after grpc.http2.ping_timeout_ms (default 60 s),
# not keepalive_timeout_ms alone: both are set. A ping goes out after keepalive_time without data from the peer,
# at most grpc.http2.max_pings_without_data (default 2, kept) in a row until we send data again: gRPC servers
# count pings faster than `grpc.http2.min_ping_interval_without_data_ms` (default 5 min) as strikes and answer
# the third with GOAWAY ENHANCE_YOUR_CALM ("too_many_pings"), which fails every call on the connection; qwenpd's
# servers take one every 10 s (grpc_server.server_options), other servers get at most two per silence.
KEEPALIVE_OPTIONS = (("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                     ("grpc.http2.ping_timeout_ms", 10_000))


def channel(address: str, sec: Security | None = None, options: Iterable[tuple[str, Any]] = (), *,
            aio: bool = False) -> Any:
    """A grpc (aio=False) or grpc.aio channel to `address` with this config's TLS and bearer token, reconnecting
    within a second of a backend's return (RECONNECT_OPTIONS, unless `options` set them)."""
    sec = sec or Security()
    creds = channel_credentials(sec)
    token = sec.token()
    opts = list(options)
    opts += [(k, v) for k, v in RECONNECT_OPTIONS if k not in {name for name, _ in opts}]
    if aio:
        interceptors = [_AioUnaryToken(token), _AioStreamToken(token)] if token else None
        if creds is None:
            return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)
    ch = grpc.insecure_channel(address, options=opts) if creds is None else grpc.secure_channel(address, creds, opts)
    return grpc.intercept_channel(ch, _SyncToken(token)) if token else ch
