"""GatewayConfig: everything the gateway is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path
import json
from typing import Any
from dataclasses import dataclass, field

from qwenpd import service_config
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.security import Security
from qwenpd.service_config import DEFAULT_GRACE_S, check_address, check_server


DEFAULT_RESUME_WAIT_S = 15.0


@dataclass(slots=True)
class GatewayConfig:
    """prefill / decode: the backends' addresses. listen: gRPC HOST:PORT; http_listen: the OpenAI-compatible HTTP
    API's HOST:PORT ("" = off); port 0 = any free port. timeout_s: deadline of a request's backend calls (a gRPC
    caller's own deadline wins when shorter). max_in_flight_prefill / _decode: calls of ours one backend may
    have running (0 = no bound); past every backend's bound a request is refused with RESOURCE_EXHAUSTED (HTTP
    429). health_interval_s: how often backends are checked (ejected while down, readmitted when back).
    resume_wait_s: how long a broken stream waits for a decode instance to answer. served_model_names: the names
    the HTTP API serves the model under, the first one reported (none = the prefill's model name). cors_origins:
    origins a browser may call the HTTP API from (none = no CORS headers: other sites' pages cannot read
    answers; POST bodies must be application/json in any case). security: TLS and bearer token of both servers
    and of the backend calls."""

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    encoders: tuple[str, ...] = ()  # an encoder pool (qwenpd serve encoder): image prompts are encoded there first
    listen: str = "127.0.0.1:0"
    http_listen: str = ""
    timeout_s: float = 600.0
    max_in_flight_prefill: int = 64
    max_in_flight_decode: int = 512
    health_interval_s: float = 1.0
    resume_wait_s: float = DEFAULT_RESUME_WAIT_S
    served_model_names: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    default_chat_template_kwargs: str = ""  # a JSON object: chat template arguments a request does not set itself
    # where image URLs may be fetched from (gateway/media.py): hosts, and a local folder for file URLs; none = only
    # data: URLs
    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: str = ""
    grace_s: float = DEFAULT_GRACE_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int = 0
    security: Security = field(default_factory=Security)

    def __post_init__(self) -> None:
        self.prefill, self.decode, self.encoders = tuple(self.prefill), tuple(self.decode), tuple(self.encoders)
        for a in self.encoders:
            check_address("encoders", a)
        self.served_model_names, self.cors_origins = tuple(self.served_model_names), tuple(self.cors_origins)
        self.allowed_media_domains = tuple(self.allowed_media_domains)
        if self.allowed_local_media_path and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path!r} is not a folder")
        if any(not name or not name.strip() for name in self.served_model_names):
            raise ValueError("served_model_names: a name must not be empty")
        if self.default_chat_template_kwargs and not isinstance(self.template_defaults, dict):
            raise ValueError("default_chat_template_kwargs must be a JSON object")
        check_server(self.listen, self.grace_s, self.metrics_port)
        for kind, addrs in (("prefill", self.prefill), ("decode", self.decode)):
            if not addrs:
                raise ValueError(f"give at least one {kind} address")
            for a in addrs:
                check_address(kind, a)
        if self.http_listen:
            check_address("http_listen", self.http_listen)
        for name in ("timeout_s", "health_interval_s", "resume_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_in_flight_prefill", "max_in_flight_decode"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def template_defaults(self) -> Any:
        """default_chat_template_kwargs parsed (None if it is not JSON)."""
        return _template_defaults(self.default_chat_template_kwargs)


def _template_defaults(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return None


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def add_args(p: argparse.ArgumentParser) -> None:
    d = service_config.field_defaults(GatewayConfig)
    p.add_argument("--prefill", required=True, type=_addresses, help="prefill addresses HOST:PORT, comma-separated")
    p.add_argument("--decode", required=True, type=_addresses, help="decode addresses HOST:PORT, comma-separated")
    p.add_argument("--encoders", type=_addresses, default=(), help="encoder addresses HOST:PORT, comma-separated "
                   "(qwenpd serve encoder): the vision tower runs there, prefill reads its output from the cache "
                   "store (default: none, prefill runs the tower)")
    service_config.add_server_args(p, d)  # --listen (gRPC), --grace, TLS and token, --metrics-port
    p.add_argument("--http-listen", default=d.http_listen, help="OpenAI-compatible HTTP API HOST:PORT (default: off)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, dest="timeout_s",
                   help=f"seconds a request's backend calls may take (default {d.timeout_s:g})")
    p.add_argument("--max-in-flight-prefill", type=int, default=d.max_in_flight_prefill,
                   help=f"our calls per prefill instance (default {d.max_in_flight_prefill}; 0 = any)")
    p.add_argument("--max-in-flight-decode", type=int, default=d.max_in_flight_decode,
                   help=f"our streams per decode instance (default {d.max_in_flight_decode}; 0 = any)")
    p.add_argument("--health-interval", type=float, default=d.health_interval_s, dest="health_interval_s",
                   help=f"seconds between backend health checks (default {d.health_interval_s:g})")
    p.add_argument("--resume-wait", type=float, default=d.resume_wait_s, dest="resume_wait_s",
                   help=f"seconds a broken stream waits for some decode instance to answer (default {d.resume_wait_s:g})")
    add_http_args(p)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, help="largest gRPC message")


def add_http_args(p: argparse.ArgumentParser) -> None:
    """The HTTP API's naming and CORS flags (serve gateway and serve all)."""
    p.add_argument("--served-model-name", "--model-name", nargs="+", default=(), dest="served_model_names",
                   metavar="NAME", help="names the HTTP API serves the model under, the first one reported "
                   "(default: the prefill's model name: the checkpoint's _name_or_path or folder)")
    p.add_argument("--default-chat-template-kwargs", default="", metavar="JSON",
                   help="chat template arguments of every chat request that does not set them itself, a JSON object, "
                   "e.g. '{\"enable_thinking\": false}' (default: none)")
    p.add_argument("--cors-origin", action="append", default=[], dest="cors_origins", metavar="ORIGIN",
                   help="an origin browsers may call the HTTP API from, e.g. https://app.example (repeatable; "
                   "default: none, no CORS headers)")
    p.add_argument("--allowed-media-domains", nargs="+", default=(), metavar="HOST",
                   help="hosts (and their subdomains) image_url http(s) URLs may be fetched from (default: none, "
                        "only data: URLs)")
    p.add_argument("--allowed-local-media-path", default="", metavar="DIR",
                   help="a folder image_url file:// URLs may read from (default: none)")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return service_config.from_args(GatewayConfig, args)
