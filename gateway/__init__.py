"""The gateway: one address for every caller. gRPC `qwenpd.v1.GenerateService/Generate` and an OpenAI-compatible
HTTP API over pools of prefill and decode instances, with routing, health checks and crash resume
(qwenpd.clients.dispatch). Imports the clients, the protos and the shared modules; never a service or the engine."""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
