"""A `qwenpd serve gateway` process for tests: start it on ports 0 and read its addresses back."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.services.conftest import qwenpd_cmd, wait_ready_file


@dataclass
class GatewayProc:
    address: str  # gRPC
    http: str  # HOST:PORT of the HTTP API
    proc: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"http://{self.http}/v1"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def start_gateway(tmp: Path, prefill: list[str], decode: list[str], *extra: str) -> GatewayProc:
    ready = tmp / f"gateway-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(qwenpd_cmd("serve", "gateway", "--prefill", ",".join(prefill), "--decode",
                                       ",".join(decode), "--http-listen", "127.0.0.1:0", "--health-interval", "0.2",
                                       "--ready-file", str(ready), "--log-level", "WARNING", *extra))
    try:
        info = wait_ready_file(ready, proc, timeout=60)
    except BaseException:
        proc.kill()
        raise
    return GatewayProc(info["address"], info["http"], proc)


def decode_active(address: str) -> int:
    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        load = decode_pb2_grpc.DecodeServiceStub(ch).GetLoad(decode_pb2.GetLoadRequest(), timeout=5)
    return load.active_sequences + load.queued


def wait_idle(address: str, timeout: float = 5.0) -> float:
    """Seconds until the decode service at `address` has no sequence; AssertionError after `timeout`."""
    start = time.monotonic()
    while decode_active(address):
        assert time.monotonic() - start < timeout, f"decode {address} still busy after {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - start
