"""Callers of the services: `Client` / `AsyncClient` (prefill -> decode with one call), their errors, and the
serving CLI (clients.cli: `qwenpd serve ...`, `qwenpd demo`). Importing this package does not import torch."""

from qwenpd.clients.client import AsyncClient, Chunk, Client, Result
from qwenpd.clients.errors import (Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                            QwenpdError, RemoteError, ResourceExhausted, Unauthenticated, Unavailable)
from qwenpd.security import Security

__all__ = ["AsyncClient", "Chunk", "Client", "Result", "Cancelled", "DataLoss", "DeadlineExceeded",
           "FailedPrecondition", "InvalidArgument", "NotFound", "QwenpdError", "RemoteError", "ResourceExhausted",
           "Security", "Unauthenticated", "Unavailable"]
