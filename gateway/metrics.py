"""Prometheus metrics of the gateway: gRPC calls by method and code (the shared `qwenpd_requests`), HTTP
requests by route and status, time to first token and time per output token (clients.dispatch.Trace: over
tokens from the first token's time, so true when tokens share a chunk), output tokens, resumes, backend health."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from qwenpd.metrics import Metrics


class GatewayMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("gateway")
        self.http_requests = Counter("qwenpd_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=self.registry)
        self.ttft = self._histogram("qwenpd_gateway_ttft_seconds",
                                    "request arrival at the gateway to the first token (prefill's answer)")
        self.tpot = self._histogram("qwenpd_gateway_tpot_seconds", "time per output token of a finished completion: "
                                    "(last token - first token) / (tokens - 1)")
        self.output_tokens = Counter("qwenpd_gateway_output_tokens", "tokens streamed to callers",
                                     registry=self.registry)
        self.resumes = Counter("qwenpd_gateway_resumes", "streams continued on another decode instance after a "
                               "failure", registry=self.registry)
        self.backend_up = Gauge("qwenpd_backend_up", "1 while a backend passes health checks, 0 while ejected",
                                ["kind", "address"], registry=self.registry)
