"""The multi-host data plane on Mooncake Store (https://github.com/kvcache-ai/Mooncake), `--backend mooncake`.

The cache store keeps its index, leases, refcounts and prefix logic; only the bytes move into Mooncake:

    cache store   mounts one Mooncake segment (the bytes live there and vanish when this client closes, so the
                  long-lived store process owns it), names one object per entry, removes it on free/eviction
    prefill       writes a checkpoint into a registered staging buffer, then put_from / batch_put_from
    decode        batch_get_into a registered buffer, then reads the checkpoint in place (zero-copy views)

The budget stays ours: the mounted segment is larger than the budget, so Mooncake's own eviction (at its high
watermark) never runs; if bytes vanish anyway (a restarted store, a dead master) readers get NOT_FOUND or
UNAVAILABLE, never other bytes: object keys are random and never reused, and every tensor is checksummed.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qwenpd.address import split_address
from qwenpd.cache_store.allocator import Extent
from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'qwenpd[mooncake]' (the mooncake-transfer-engine-non-cuda wheel; on trn2 hosts "
                "mooncake-transfer-engine-efa-non-cuda) and apt-get install libibverbs1 libnuma1")
KEY_PREFIX = "qwenpd/"
_OBJECT_NOT_FOUND = -704  # mooncake ErrorCode::OBJECT_NOT_FOUND
# mooncake ErrorCode::RPC_FAIL / RPC_TIMEOUT: the master did not answer (each such call waits out a timeout)
_MASTER_SILENT = (-900, -901)
_SKIP_REMOVES_S = 5.0  # after a remove the master did not answer, frees skip their removes this long
_CONNECT_TIMEOUT_S = 3.0
_ALIGN = 4096


def _store_class() -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise FailedPrecondition(f"the mooncake backend needs the Mooncake Store library ({exc}): {INSTALL_HINT}",
                                 subject="mooncake", reason="MOONCAKE_MISSING") from None
    return MooncakeDistributedStore


def available() -> str | None:
    """None if the library imports, else why not (for skips and error messages)."""
    try:
        _store_class()
    except FailedPrecondition as exc:
        return exc.message
    return None


def _split(address: str) -> tuple[str, int]:
    try:
        return split_address(address)
    except ValueError:
        raise FailedPrecondition(f"mooncake master must be HOST:PORT, got {address!r}", subject="mooncake_master",
                                 reason="BAD_MOONCAKE_MASTER") from None


def local_address(master: str) -> str:
    """This host's address on the route to the master: what other hosts reach our transfer engine at."""
    host, port = _split(master)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


def _check_reachable(master: str, metadata: str) -> None:
    """Fail fast (UNAVAILABLE) instead of letting the library retry for minutes."""
    host, port = _split(master)
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise Unavailable(f"mooncake master {master} is unreachable ({exc}); start it with "
                          "`mooncake_master -enable_http_metadata_server=true ...`", subject="mooncake_master",
                          retry_after_s=1.0, reason="MOONCAKE_UNREACHABLE") from None
    if metadata.startswith("http"):
        try:
            urllib.request.urlopen(metadata + "?key=qwenpd_probe", timeout=_CONNECT_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # 404 for an unknown key: the server is up
        except OSError as exc:
            raise Unavailable(f"mooncake metadata server {metadata} is unreachable ({exc})",
                              subject="mooncake_metadata", retry_after_s=1.0, reason="MOONCAKE_UNREACHABLE") from None


def connect(master: str, metadata: str, hostname: str = "", segment_bytes: int = 0,
            buffer_bytes: int = 16 << 20) -> Any:
    """A set-up MooncakeDistributedStore over TCP; `segment_bytes` > 0 mounts a segment that holds objects."""
    cls = _store_class()
    _check_reachable(master, metadata)
    client = cls()
    rc = client.setup(hostname or local_address(master), metadata, segment_bytes, buffer_bytes, "tcp", "", master)
    if rc != 0:
        raise Unavailable(f"mooncake setup against master {master} failed (code {rc})", subject="mooncake_master",
                          retry_after_s=1.0, reason="MOONCAKE_SETUP_FAILED")
    return client


class MooncakeSpace:
    """The store side: one object per entry in the segment this process mounts. Pure bookkeeping apart from
    remove calls; the budget is the index's."""

    def __init__(self, config: CacheStoreConfig):
        self.config = config
        self.prefix = f"{KEY_PREFIX}{config.store_id}/"
        self.client: Any = None
        self._master_silent_until = 0.0  # time.monotonic(): frees skip their removes until then

    def open(self) -> list[str]:
        c = self.config
        mounted = (c.budget_bytes * 4 // 3 + (64 << 20)) // _ALIGN * _ALIGN  # stay below Mooncake's watermark
        self.client = connect(c.mooncake_master, c.mooncake_metadata, c.mooncake_hostname, mounted)
        removed = self.client.remove_by_regex(f"^{self.prefix}", True)
        return [f"{removed} objects"] if removed > 0 else []

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.remove_by_regex(f"^{self.prefix}", True)
            finally:
                self.client.close()
                self.client = None

    def rounded(self, size: int) -> int:
        return max(_ALIGN, (size + _ALIGN - 1) // _ALIGN * _ALIGN)

    @property
    def total_bytes(self) -> int:
        return self.config.budget_bytes

    @property
    def segments(self) -> int:
        return 1

    def place(self, need: int, evict_one: Callable[[], bool]) -> Extent:
        return Extent(f"{self.prefix}{secrets.token_hex(16)}", 0, need)

    def free(self, extent: Extent) -> None:
        """Remove the entry's object. While the master does not answer, removes are skipped for a few seconds
        rather than each waiting out Mooncake's RPC timeout (~4 s) one after another, which held up the request
        that freed them (an aborted put of N blocks: N timeouts): a dead master's objects died with it, and a
        live one's skipped objects (random keys, never read again) go with the store's prefix at its next
        start or close (`open`, `close`)."""
        if time.monotonic() < self._master_silent_until:
            return
        rc = self.client.remove(extent.segment, True)
        if rc in _MASTER_SILENT:
            self._master_silent_until = time.monotonic() + _SKIP_REMOVES_S
            log.warning("mooncake master did not answer the remove of %s: removes skipped for %g s",
                        extent.segment, _SKIP_REMOVES_S)
        elif rc != 0 and rc != _OBJECT_NOT_FOUND:  # never written (aborted), or gone already: fine
            log.warning("mooncake remove %s failed (code %d)", extent.segment, rc)


class _Buffer:
    """Page-aligned host memory registered with the transfer engine (zero-copy for RDMA/EFA)."""

    def __init__(self, client: Any, size: int):
        raw = np.empty(size + _ALIGN, dtype=np.uint8)
        start = (-raw.ctypes.data) % _ALIGN
        self.array = raw[start:start + size]
        self.ptr = self.array.ctypes.data
        self.size = size
        self._client = client
        client.register_buffer(self.ptr, max(size, 1))

    def unregister(self) -> None:
        self._client.unregister_buffer(self.ptr)


class MooncakePlane:
    """The client side (prefill writes, decode and prefix lookups read)."""

    def __init__(self, master: str, metadata: str):
        self.client = connect(master, metadata)
        self._staging: _Buffer | None = None
        self._lock = threading.Lock()

    def write_many(self, writers: Sequence[Any], keys: Sequence[str]) -> None:
        """Serialize every checkpoint into one staging buffer, then one batch put."""
        sizes = [w.nbytes for w in writers]
        offsets = np.cumsum([0, *(-(-n // _ALIGN) * _ALIGN for n in sizes)]).tolist()
        with self._lock:
            if self._staging is None or self._staging.size < offsets[-1]:
                if self._staging is not None:
                    self._staging.unregister()
                self._staging = _Buffer(self.client, max(offsets[-1], 1 << 20))
            buf = self._staging
            for w, off in zip(writers, offsets):
                w.write_into(memoryview(buf.array)[off:off + w.nbytes])
            ptrs = [buf.ptr + off for off in offsets[:-1]]
            codes = self.client.batch_put_from(list(keys), ptrs, sizes) if len(keys) > 1 else \
                [self.client.put_from(keys[0], ptrs[0], sizes[0])]
        for key, rc in zip(keys, codes):
            if rc != 0:
                raise Unavailable(f"mooncake put of {key} failed (code {rc})", subject="mooncake",
                                  retry_after_s=0.5, reason="MOONCAKE_PUT_FAILED")

    def read_many(self, keys: Sequence[str], sizes: Sequence[int]) -> list[memoryview]:
        """Fetch objects into one fresh registered buffer; the views stay valid as long as anything uses them.
        A key asked for twice is fetched once (a batch get with repeated keys fills only one buffer)."""
        unique = dict(zip(keys, sizes))
        if len(unique) < len(keys):
            views = dict(zip(unique, self.read_many(list(unique), list(unique.values()))))
            return [views[k] for k in keys]
        offsets = np.cumsum([0, *(-(-n // _ALIGN) * _ALIGN for n in sizes)]).tolist()
        buf = _Buffer(self.client, max(offsets[-1], 1))
        try:
            ptrs = [buf.ptr + off for off in offsets[:-1]]
            codes = self.client.batch_get_into(list(keys), ptrs, list(sizes)) if len(keys) > 1 else \
                [self.client.get_into(keys[0], ptrs[0], sizes[0])]
        finally:
            buf.unregister()
        for key, size, rc in zip(keys, sizes, codes):
            if rc == _OBJECT_NOT_FOUND:
                raise NotFound(f"the bytes of {key} are gone from Mooncake Store (evicted or the store restarted)",
                               resource_type="mooncake_object", resource_name=key, reason="BYTES_GONE")
            if rc != size:
                raise Unavailable(f"mooncake get of {key} failed (code {rc}, expected {size} bytes)",
                                  subject="mooncake", retry_after_s=0.5, reason="MOONCAKE_GET_FAILED")
        view = memoryview(buf.array)
        return [view[off:off + n] for off, n in zip(offsets, sizes)]

    def close(self) -> None:
        with self._lock:
            if self.client is not None:
                self.client.close()
                self.client = None
