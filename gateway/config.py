"""GatewayConfig: everything the gateway is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qwenpd import security as security_mod
from qwenpd.address import split_address
from qwenpd.limits import DEFAULT_MAX_MESSAGE_BYTES
from qwenpd.security import Security


@dataclass(slots=True)
class GatewayConfig:
    """prefill / decode: the backends' addresses. listen: gRPC HOST:PORT; http_listen: the OpenAI-compatible HTTP
    API's HOST:PORT ("" = off); port 0 = any free port. timeout_s: deadline of a request's backend calls (a gRPC
    caller's own deadline wins when shorter). max_in_flight_prefill / _decode: calls of ours one backend may
    have running (0 = no bound); past every backend's bound a request is refused with RESOURCE_EXHAUSTED (HTTP
    429). health_interval_s: how often backends are checked (ejected while down, readmitted when back).
    resume_wait_s: how long a broken stream waits for a decode instance to answer. model_name: the name the HTTP
    API serves ("" = the prefill's). security: TLS and bearer token of both servers and of the backend calls."""

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    listen: str = "127.0.0.1:0"
    http_listen: str = ""
    timeout_s: float = 600.0
    max_in_flight_prefill: int = 64
    max_in_flight_decode: int = 512
    health_interval_s: float = 1.0
    resume_wait_s: float = 15.0
    model_name: str = ""
    grace_s: float = 5.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int = 0
    security: Security = field(default_factory=Security)

    def __post_init__(self) -> None:
        self.prefill, self.decode = tuple(self.prefill), tuple(self.decode)
        for kind, addrs in (("prefill", self.prefill), ("decode", self.decode)):
            if not addrs:
                raise ValueError(f"give at least one {kind} address")
            for a in addrs:
                split_address(a)
        split_address(self.listen)
        if self.http_listen:
            split_address(self.http_listen)
        for name in ("timeout_s", "health_interval_s", "resume_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_in_flight_prefill", "max_in_flight_decode", "grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")

    def flags(self) -> list[str]:
        """The command-line flags that rebuild this config (for a child process)."""
        out = ["--prefill", ",".join(self.prefill), "--decode", ",".join(self.decode), "--listen", self.listen,
               "--timeout", str(self.timeout_s), "--max-in-flight-prefill", str(self.max_in_flight_prefill),
               "--max-in-flight-decode", str(self.max_in_flight_decode), "--health-interval",
               str(self.health_interval_s), "--resume-wait", str(self.resume_wait_s), "--grace", str(self.grace_s),
               "--max-message-bytes", str(self.max_message_bytes), *self.security.flags()]
        if self.http_listen:
            out += ["--http-listen", self.http_listen]
        if self.model_name:
            out += ["--model-name", self.model_name]
        if self.metrics_port:
            out += ["--metrics-port", str(self.metrics_port)]
        return out


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", required=True, type=_addresses, help="prefill addresses HOST:PORT, comma-separated")
    p.add_argument("--decode", required=True, type=_addresses, help="decode addresses HOST:PORT, comma-separated")
    p.add_argument("--listen", default="127.0.0.1:0", help="gRPC HOST:PORT (port 0 = any free port)")
    p.add_argument("--http-listen", default="", help="OpenAI-compatible HTTP API HOST:PORT (default: off)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request's backend calls may take")
    p.add_argument("--max-in-flight-prefill", type=int, default=64, help="our calls per prefill instance (0 = any)")
    p.add_argument("--max-in-flight-decode", type=int, default=512, help="our streams per decode instance (0 = any)")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between backend health checks")
    p.add_argument("--resume-wait", type=float, default=15.0,
                   help="seconds a broken stream waits for some decode instance to answer")
    p.add_argument("--model-name", default="", help="model name of the HTTP API (default: the prefill's)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls may finish on SIGTERM")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest gRPC message")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (default 0 = off)")
    security_mod.add_args(p)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(prefill=args.prefill, decode=args.decode, listen=args.listen, http_listen=args.http_listen,
                         timeout_s=args.timeout, max_in_flight_prefill=args.max_in_flight_prefill,
                         max_in_flight_decode=args.max_in_flight_decode, health_interval_s=args.health_interval,
                         resume_wait_s=args.resume_wait, model_name=args.model_name, grace_s=args.grace,
                         max_message_bytes=args.max_message_bytes, metrics_port=args.metrics_port,
                         security=security_mod.from_args(args))
