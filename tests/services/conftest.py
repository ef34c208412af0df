"""One `qwenpd serve all` on the tiny model for the whole session (real processes on 127.0.0.1, ports 0); the
in-process engine on the same checkpoint, the reference, is tests/conftest.py's `engine`.

QWENPD_TEST_COMPILE=1 runs the suites compiled: every prefill and decode service the tests start (through
`start_serve_all` or `model_service_flags()`) compiles its graphs over a fixed paged KV cache (`--compile
--kv-cache-bytes`), and the eager in-process engine stays the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwenpd.clients import Client

SHM_DIR = Path("/dev/shm")
COMPILE = os.environ.get("QWENPD_TEST_COMPILE", "") not in ("", "0")
COMPILE_KV_BYTES = "16MiB"  # tiny: 32 KiB per 64-token page (64 KiB with the MTP head), the whole context fits
COMPILED_READY_TIMEOUT_S = 600.0  # a cold compile of every bucket takes minutes on 2 cores
READY_TIMEOUT_S = COMPILED_READY_TIMEOUT_S if COMPILE else 120.0


@dataclass
class Services:
    cache: str
    prefill: str
    decode: str
    store_id: str
    proc: subprocess.Popen
    children: dict[str, int]
    gateway: str = ""  # the gateway's gRPC address
    http: str = ""  # its HTTP API, HOST:PORT


def qwenpd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwenpd.cli", *args]


def model_service_flags(*given: str) -> list[str]:
    """Flags every `serve prefill|decode|all` of the tests adds: --compile over a fixed KV cache when
    QWENPD_TEST_COMPILE=1 (unless `given`, the test's own flags, already choose), else none."""
    if not COMPILE or "--compile" in given:
        return []
    return ["--compile", *(() if "--kv-cache-bytes" in given else ("--kv-cache-bytes", COMPILE_KV_BYTES))]


def wait_ready_file(path: Path, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args} not ready after {timeout}s")
        time.sleep(0.05)
    return json.loads(path.read_text())


def segments(store_id: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"qwenpd-{store_id}-*"))


def start_serve_all(model_dir: Path, tmp: Path, store_id: str, *extra: str) -> Services:
    ready = tmp / f"{store_id}.json"
    flags = [*model_service_flags(*extra), *extra]
    # a test's own --compile too: ~60 s alone, twice that beside another test worker on 2 cores
    timeout = COMPILED_READY_TIMEOUT_S if "--compile" in flags else READY_TIMEOUT_S
    proc = subprocess.Popen(qwenpd_cmd("serve", "all", "--model", str(model_dir), "--store-id", store_id,
                                       "--threads", "1", "--ready-file", str(ready), "--log-level", "WARNING",
                                       "--start-timeout", str(timeout), *flags))
    try:
        info = wait_ready_file(ready, proc, timeout)
    except BaseException:
        proc.kill()
        raise
    return Services(info["cache"], info["prefill"], info["decode"], store_id, proc, info["children"],
                    info.get("gateway", ""), info.get("http", ""))


def stop_serve_all(s: Services, timeout: float = 30.0) -> int:
    s.proc.send_signal(signal.SIGTERM)
    return s.proc.wait(timeout)


def quiet(read, timeout: float = 5.0, still: float = 0.3):
    """read() once its value has not changed for `still` seconds (a test's baseline of the store's counts: earlier
    tests' streams release their resume points' leases and delete them a moment after they end)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < still and time.monotonic() < deadline:
        time.sleep(0.02)
        if (now := read()) != last:
            last, since = now, time.monotonic()
    return last


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def services(tiny_model_dir, tmp_path_factory):
    s = start_serve_all(tiny_model_dir, tmp_path_factory.mktemp("serve"), f"test{os.getpid()}")
    yield s
    code = stop_serve_all(s)
    assert code == 0, f"serve all exited with {code}"
    assert not any(pid_alive(p) for p in s.children.values()), "a child outlived serve all"
    assert segments(s.store_id) == [], "shared-memory segments left behind"


@pytest.fixture(scope="module")
def gateway(services, tmp_path_factory):
    """A gateway (HTTP and gRPC Generate) over the session's services, one per test module."""
    from tests.services.gateway_proc import start_gateway  # it imports this module

    g = start_gateway(tmp_path_factory.mktemp("gateway"), [services.prefill], [services.decode])
    yield g
    assert g.stop() == 0


@pytest.fixture(scope="session")
def client(services):
    with Client(prefill=services.prefill, decode=services.decode, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def store(services):
    from qwenpd.cache_store.client import CacheStoreClient

    with CacheStoreClient(services.cache) as c:
        yield c


# ---- data-plane backends ----------------------------------------------------------------------------------------
BACKENDS = ["shm", "mooncake"]


def mooncake_skip_reason() -> str | None:
    """Why the mooncake backend cannot run here (None: it can)."""
    from qwenpd.cache_store.mooncake import available
    from qwenpd.cache_store.mooncake_master import master_binary

    missing = available()
    if missing:
        return f"mooncake backend unavailable: {missing}"
    if master_binary() is None:
        return "mooncake backend unavailable: no mooncake_master binary"
    return None


def backend_flags(backend: str) -> list[str]:
    """serve-all flags for a backend; skips the test where mooncake cannot run."""
    if backend == "mooncake":
        reason = mooncake_skip_reason()
        if reason:
            pytest.skip(reason)
        return ["--backend", "mooncake"]
    return []


@pytest.fixture(scope="module", params=BACKENDS)
def backend_services(request, services, tiny_model_dir, tmp_path_factory):
    """`services` (shm), and a serve-all on the mooncake backend with its own local master."""
    if request.param == "shm":
        yield services
        return
    s = start_serve_all(tiny_model_dir, tmp_path_factory.mktemp("serve_mc"), f"mc{os.getpid()}",
                        *backend_flags("mooncake"))
    from qwenpd.cache_store.client import CacheStoreClient
    from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb

    with CacheStoreClient(s.cache) as store:
        assert store.info().data_plane == pb.DATA_PLANE_MOONCAKE
    yield s
    assert stop_serve_all(s) == 0
