"""`qwenpd serve all` and the demo: the cache store, prefill and decode services as child processes.

Each child is `python -m qwenpd.cli serve <kind> ... --ready-file F` and writes its bound address to F once it
serves (so port 0 works); the parent then checks grpc.health.v1 says SERVING for each. Stopping sends SIGTERM
to prefill and decode first (they drain and release their leases), then to the cache store (which removes its
shared-memory segments), and SIGKILLs whatever has not exited after the grace period. Children also get
SIGTERM if this process dies (PR_SET_PDEATHSIG), so none outlive it; they run in their own session, so a
terminal Ctrl-C reaches only the parent, which stops them in order.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwenpd import limits as limits_mod
from qwenpd import security as security_mod
from qwenpd.limits import Limits
from qwenpd.security import Security

if TYPE_CHECKING:
    from qwenpd.cache_store.mooncake_master import MooncakeMaster

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    role: str
    argv: list[str]
    ready_file: Path
    proc: subprocess.Popen | None = None
    address: str = ""
    netns: str = ""  # run inside this network namespace (`ip netns exec`; tests of multi-host serving)

    def start(self) -> None:
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "qwenpd.cli", *self.argv,
                                      "--ready-file", str(self.ready_file)],
                                     preexec_fn=_die_with_parent, start_new_session=True)

    def wait_ready(self, deadline: float) -> str:
        assert self.proc is not None
        while not self.ready_file.exists():
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"{self.role} exited with code {code} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} did not start serving in time")
            time.sleep(0.02)
        self.address = json.loads(self.ready_file.read_text())["address"]
        return self.address


@dataclass
class ServiceSet:
    """Start with `with ServiceSet(model=...) as s:`; addresses in s.cache / s.prefill / s.decode."""

    model: str
    host: str = "127.0.0.1"
    cache_port: int = 0
    prefill_port: int = 0
    decode_port: int = 0
    dtype: str = "auto"
    prefill_device: str = "cpu"
    decode_device: str = "cpu"
    prefill_cores: str | None = None  # NeuronCores of each (trn2: disjoint sets on one host)
    decode_cores: str | None = None
    kv_cache_bytes: str | None = None  # each of prefill and decode (e.g. "4GiB"); None = grows on demand
    compile: bool = False
    chunk_size: int = 512
    max_batch: int = 32
    threads: int | None = None
    budget: str = "4GiB"
    store_id: str = "default"
    start_timeout_s: float = 120.0
    grace_s: float = 5.0  # in-flight calls may finish within this on stop
    log_level: str = "INFO"
    block_size: int = 256
    snapshot_interval: int = 2048
    prefix_cache: bool = True
    backend: str = "shm"  # cache store data plane: shm or mooncake
    mooncake_master: str = ""  # mooncake: HOST:PORT of a running master; "" = start a local one on `host`
    mooncake_metadata: str = ""  # mooncake: its metadata URL (with mooncake_master)
    # prefill/decode elsewhere (tests of multi-host serving): listen host and network namespace of each
    prefill_host: str = ""
    decode_host: str = ""
    prefill_netns: str = ""
    decode_netns: str = ""
    security: Security = field(default_factory=Security)  # TLS / mTLS / token of all three and their links
    limits: Limits = field(default_factory=Limits)  # per-request limits of prefill and decode
    metrics_port: int = 0  # 0 = off; else /metrics of cache store, prefill, decode on this port, +1, +2
    prefill_max_queue: int = 64
    decode_max_queue: int = 256
    children: list[Child] = field(default_factory=list)
    master: "MooncakeMaster | None" = None
    _tmp: tempfile.TemporaryDirectory | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServiceSet":
        return cls(model=args.model, host=args.host, cache_port=args.cache_port, prefill_port=args.prefill_port,
                   decode_port=args.decode_port, dtype=args.dtype, prefill_device=args.prefill_device,
                   decode_device=args.decode_device, prefill_cores=args.prefill_cores,
                   decode_cores=args.decode_cores, kv_cache_bytes=args.kv_cache_bytes, compile=args.compile,
                   chunk_size=args.chunk_size,
                   max_batch=args.max_batch, threads=args.threads, budget=args.budget, store_id=args.store_id,
                   start_timeout_s=args.start_timeout, grace_s=args.grace, log_level=args.log_level,
                   block_size=args.block_size, snapshot_interval=args.snapshot_interval,
                   prefix_cache=args.prefix_cache, backend=args.backend, mooncake_master=args.mooncake_master,
                   mooncake_metadata=args.mooncake_metadata, security=security_mod.from_args(args),
                   limits=limits_mod.from_args(args), metrics_port=args.metrics_port,
                   prefill_max_queue=args.prefill_max_queue, decode_max_queue=args.decode_max_queue)

    @property
    def cache(self) -> str:
        return self.children[0].address

    @property
    def prefill(self) -> str:
        return self.children[1].address

    @property
    def decode(self) -> str:
        return self.children[2].address

    def pids(self) -> dict[str, int]:
        return {c.role: c.proc.pid for c in self.children if c.proc is not None}

    def _listen(self, port: int, host: str = "") -> str:
        host = host or self.host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _backend_flags(self) -> list[str]:
        if self.backend != "mooncake":
            return []
        master, metadata = self.mooncake_master, self.mooncake_metadata
        if not master:
            from qwenpd.cache_store.mooncake_master import MooncakeMaster
            self.master = MooncakeMaster(self.host).start()
            master, metadata = self.master.address, self.master.metadata_url
        return ["--backend", "mooncake", "--mooncake-master", master, "--metadata", metadata]

    def _metrics_flags(self, offset: int) -> list[str]:
        return ["--metrics-port", str(self.metrics_port + offset)] if self.metrics_port else []

    def _prefix_flags(self) -> list[str]:
        flags = ["--block-size", str(self.block_size), "--snapshot-interval", str(self.snapshot_interval)]
        return flags if self.prefix_cache else [*flags, "--no-prefix-cache"]

    def _device_flags(self, device: str, cores: str | None) -> list[str]:
        return ["--device", device, *(["--neuron-cores", cores] if cores else [])]

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="qwenpd-serve-")
        tmp = Path(self._tmp.name)
        deadline = time.monotonic() + self.start_timeout_s
        common = ["--log-level", self.log_level, "--grace", str(self.grace_s), *self.security.flags()]
        self.children = []
        try:
            cache = Child("cache store", ["serve", "cache", "--listen", self._listen(self.cache_port), "--budget",
                                          self.budget, "--store-id", self.store_id, *self._backend_flags(), *common,
                                          *self._metrics_flags(0)],
                          tmp / "cache.json")
            self.children = [cache]
            cache.start()
            cache.wait_ready(deadline)
            model = ["--model", self.model, "--cache", cache.address, "--dtype", self.dtype, *common,
                     *self.limits.flags()]
            if self.threads:
                model += ["--threads", str(self.threads)]
            if self.kv_cache_bytes:
                model += ["--kv-cache-bytes", self.kv_cache_bytes]
            if self.compile:
                model += ["--compile"]
            self.children += [
                Child("prefill", ["serve", "prefill", "--listen", self._listen(self.prefill_port, self.prefill_host),
                                  *model, *self._device_flags(self.prefill_device, self.prefill_cores),
                                  "--chunk-size", str(self.chunk_size), *self._prefix_flags(),
                                  "--max-queue", str(self.prefill_max_queue), *self._metrics_flags(1)],
                      tmp / "prefill.json", netns=self.prefill_netns),
                Child("decode", ["serve", "decode", "--listen", self._listen(self.decode_port, self.decode_host),
                                 *model, *self._device_flags(self.decode_device, self.decode_cores),
                                 "--max-batch", str(self.max_batch), "--max-queue",
                                 str(self.decode_max_queue), *self._metrics_flags(2)], tmp / "decode.json",
                      netns=self.decode_netns),
            ]
            for child in self.children[1:]:
                child.start()
            for child in self.children:
                child.wait_ready(deadline)
                wait_serving(child.address, deadline, self.security)
        except BaseException:
            self.stop()
            raise

    def failed(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.proc is not None and c.proc.poll() is not None), None)

    def stop(self) -> dict[str, int]:
        """Stop decode and prefill, then the cache store; return each child's exit code."""
        codes: dict[str, int] = {}
        for group in (self.children[1:], self.children[:1]):
            live = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for c in live:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s + 10.0  # drain, then at most this long to exit
            for c in group:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
                codes[c.role] = c.proc.returncode
        if self.master is not None:  # after the cache store: it removes its objects through the master
            self.master.close()
            self.master = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return codes

    def __enter__(self) -> "ServiceSet":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_serving(address: str, deadline: float, security: Security | None = None) -> None:
    """Poll grpc.health.v1 Check("") until SERVING (over TLS when `security` has a CA)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with security_mod.channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report SERVING in time")
            time.sleep(0.05)


def wait_for_signal(services: ServiceSet) -> int:
    """Block until SIGINT/SIGTERM (exit 0) or until a child dies on its own (exit 1)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.2):
            dead = services.failed()
            if dead is not None:
                print(f"qwenpd serve all: {dead.role} exited with code {dead.proc.returncode}; stopping the others",
                      file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
