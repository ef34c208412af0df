"""CacheStoreConfig and its command-line flags (used by `python -m qwenpd.cache_store` and `qwenpd serve cache`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from qwenpd import service_config
from qwenpd.address import split_address
from qwenpd.cache_store.allocator import ALIGN
from qwenpd.cache_store.shm import STORE_ID_RE
from qwenpd.security import Security
from qwenpd.service_config import DEFAULT_GRACE_S, check_server
from qwenpd.units import parse_bytes


@dataclass(slots=True, frozen=True)
class CacheStoreConfig:
    """How one cache store runs. Built once at the entry point and passed down."""

    listen: str = "127.0.0.1:0"  # host:port; port 0 = any free port (read back after binding)
    budget_bytes: int = 4 << 30  # most bytes of shared memory held (segments, used or free)
    lease_ttl_s: float = 60.0  # default lease and hand-off pin duration
    allocation_ttl_s: float = 60.0  # time a writer has between AllocateSegment and CommitCheckpoint
    store_id: str = "default"  # prefixes segment names; a restarted store with the same id removes orphans
    shm_dir: str = "/dev/shm"
    segment_bytes: int = 256 << 20  # size of pooled segments; 0 = one segment per entry, removed when freed
    grace_s: float = DEFAULT_GRACE_S  # drain time on SIGTERM/SIGINT
    security: Security = field(default_factory=Security)  # TLS / mutual TLS and bearer token of the server
    metrics_port: int = 0  # Prometheus /metrics on the listen host; 0 = off
    backend: str = "shm"  # where bytes live: "shm" (same host) or "mooncake" (Mooncake Store, across hosts)
    mooncake_master: str = ""  # mooncake backend: the master's host:port
    mooncake_metadata: str = ""  # mooncake backend: metadata server URL, e.g. http://HOST:8080/metadata
    mooncake_hostname: str = ""  # address other hosts reach this store's segment at ("" = the route to the master)

    def __post_init__(self) -> None:
        check_server(self.listen, self.grace_s, self.metrics_port)
        if self.budget_bytes < ALIGN:
            raise ValueError(f"budget_bytes must be >= {ALIGN}, got {self.budget_bytes}")
        for name in ("lease_ttl_s", "allocation_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not STORE_ID_RE.match(self.store_id):
            raise ValueError(f"store_id must match {STORE_ID_RE.pattern}, got {self.store_id!r}")
        if not os.path.isdir(self.shm_dir):
            raise ValueError(f"shm_dir {self.shm_dir!r} is not a directory")
        if self.backend not in ("shm", "mooncake"):
            raise ValueError(f"backend must be shm or mooncake, got {self.backend!r}")
        if self.backend == "mooncake" and not (self.mooncake_master and self.mooncake_metadata):
            raise ValueError("the mooncake backend needs mooncake_master (HOST:PORT) and mooncake_metadata (URL)")
        if self.segment_bytes < 0 or self.segment_bytes % ALIGN:
            raise ValueError(f"segment_bytes must be 0 or a multiple of {ALIGN}, got {self.segment_bytes}")

    @property
    def host(self) -> str:
        return split_address(self.listen)[0]

    @property
    def port(self) -> int:
        return split_address(self.listen)[1]


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = service_config.field_defaults(CacheStoreConfig)
    service_config.add_server_args(parser, d)
    parser.add_argument("--budget", type=parse_bytes, default=d.budget_bytes, dest="budget_bytes",
                        help="shared memory the store may hold, e.g. 8GiB (default 4GiB)")
    parser.add_argument("--lease-ttl", type=float, default=d.lease_ttl_s, dest="lease_ttl_s", metavar="SECONDS",
                        help=f"default lease / hand-off pin duration (default {d.lease_ttl_s:g})")
    parser.add_argument("--allocation-ttl", type=float, default=d.allocation_ttl_s, dest="allocation_ttl_s",
                        metavar="SECONDS", help=f"time allowed between allocate and commit (default {d.allocation_ttl_s:g})")
    parser.add_argument("--store-id", default=d.store_id,
                        help="segment name prefix; a restarted store with the same id removes its orphans")
    parser.add_argument("--shm-dir", default=d.shm_dir, help=f"tmpfs directory for segments (default {d.shm_dir})")
    parser.add_argument("--segment-size", type=parse_bytes, default=d.segment_bytes, dest="segment_bytes",
                        help="pooled segment size (default 256MiB); 0 = one segment per entry")
    parser.add_argument("--backend", choices=("shm", "mooncake"), default=d.backend,
                        help="data plane: shm = same-host shared memory (default); mooncake = Mooncake Store, "
                             "prefill and decode on other hosts (pip install 'qwenpd[mooncake]')")
    parser.add_argument("--mooncake-master", default=d.mooncake_master, metavar="HOST:PORT",
                        help="mooncake backend: the mooncake_master RPC address")
    parser.add_argument("--metadata", "--mooncake-metadata", default=d.mooncake_metadata, dest="mooncake_metadata",
                        metavar="URL", help="mooncake backend: metadata server, e.g. http://HOST:8080/metadata")
    parser.add_argument("--mooncake-hostname", default=d.mooncake_hostname, metavar="ADDR",
                        help="mooncake backend: the address other hosts reach this store at "
                             "(default: this host's address on the route to the master)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_args(argparse.ArgumentParser(prog="python -m qwenpd.cache_store",
                                            description="qwenpd checkpoint cache store (same-host shared memory or Mooncake Store)"))


def config_from_args(args: argparse.Namespace) -> CacheStoreConfig:
    return service_config.from_args(CacheStoreConfig, args)
