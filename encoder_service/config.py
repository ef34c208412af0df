"""The encoder service's config (one slotted dataclass, checked on creation) and its flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qwenpd import service_config
from qwenpd.limits import Limits
from qwenpd.security import Security
from qwenpd.service_config import DEFAULT_GRACE_S, add_server_args, check_address, check_server


@dataclass(slots=True)
class EncoderConfig:
    """model_dir: a multimodal checkpoint (only its vision tower is loaded). cache: the cache store's address.
    dtype / device / threads: how the tower runs (dtype "auto" = the checkpoint's; prefill must run the same dtype,
    or it does not use the embeddings: they carry the vision fingerprint). max_queue: calls that may wait for the
    tower. embeddings_ttl_s: how long stored embeddings stay pinned for prefill to read (then evictable, reused
    while they last). limits: the media limits (as prefill's)."""

    model_dir: str
    cache: str
    listen: str = "127.0.0.1:0"
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    max_queue: int = 64
    embeddings_ttl_s: float = 600.0
    grace_s: float = DEFAULT_GRACE_S
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics_port: int = 0

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir: give the checkpoint directory")
        check_address("cache", self.cache)
        check_server(self.listen, self.grace_s, self.metrics_port)
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.embeddings_ttl_s <= 0:
            raise ValueError(f"embeddings_ttl_s must be > 0, got {self.embeddings_ttl_s}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def add_args(p: argparse.ArgumentParser) -> None:
    d = service_config.field_defaults(EncoderConfig)
    p.add_argument("--model", dest="model_dir", required=True, help="checkpoint directory (a multimodal one)")
    p.add_argument("--cache", required=True, help="cache store address HOST:PORT")
    add_server_args(p, argparse.Namespace(listen=d.listen, grace_s=d.grace_s, metrics_port=d.metrics_port))
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16"),
                   help="the tower's dtype (default: the checkpoint's; prefill must run the same)")
    p.add_argument("--device", default=d.device, help="torch device of the tower (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"calls waiting for the tower (default "
                                                                          f"{d.max_queue})")
    p.add_argument("--embeddings-ttl", type=float, default=d.embeddings_ttl_s, dest="embeddings_ttl_s",
                   help=f"seconds stored embeddings stay pinned for prefill (default {d.embeddings_ttl_s:g})")
    from qwenpd import limits as limits_mod

    limits_mod.add_args(p)


def config_from_args(args: argparse.Namespace) -> EncoderConfig:
    return service_config.from_args(EncoderConfig, args)
