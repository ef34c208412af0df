"""A local `mooncake_master` child process (RPC + HTTP metadata server) for `qwenpd serve all --backend mooncake`
and tests. Production runs the master on its own (`mooncake_master -enable_http_metadata_server=true ...`).

The master's HTTP metadata server binds 0.0.0.0 whatever host it is given (Mooncake 0.3.13); firewall its port
to the serving hosts (e.g. `iptables -A INPUT -p tcp --dport PORT ! -s 10.0.0.0/8 -j DROP`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from qwenpd.cache_store.mooncake import INSTALL_HINT
from qwenpd.errors import FailedPrecondition, Unavailable
from qwenpd.process import dying_with_parent


def master_binary() -> str | None:
    try:
        import mooncake
        bundled = Path(mooncake.__file__).parent / "mooncake_master"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("mooncake_master")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


class MooncakeMaster:
    """`with MooncakeMaster("127.0.0.1") as m:` → m.address (HOST:PORT), m.metadata_url. Ports: free ones,
    unless given (a restart on the same ports keeps clients' configuration valid)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, http_port: int = 0, netns: str | None = None):
        self.host, self.port, self.http_port, self.netns = host, port, http_port, netns
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="qwenpd-mooncake-master-", suffix=".log", delete=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metadata_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/metadata"

    def start(self, timeout_s: float = 15.0) -> "MooncakeMaster":
        binary = master_binary()
        if binary is None:
            raise FailedPrecondition(f"mooncake_master not found: {INSTALL_HINT}", subject="mooncake",
                                     reason="MOONCAKE_MISSING")
        self.port = self.port or _free_port(self.host)
        self.http_port = self.http_port or _free_port(self.host)
        metrics_port = _free_port(self.host)
        argv = [binary, f"-rpc_address={self.host}", f"-rpc_port={self.port}",
                "-enable_http_metadata_server=true", f"-http_metadata_server_host={self.host}",
                f"-http_metadata_server_port={self.http_port}", f"-metrics_host={self.host}",
                f"-metrics_port={metrics_port}"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = subprocess.Popen(dying_with_parent(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not (_listening(self.host, self.port) and _listening(self.host, self.http_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = Path(self._log.name).read_text(errors="replace")[-2000:]
                raise Unavailable(f"mooncake_master did not start on {self.address}: {tail}",
                                  subject="mooncake_master", reason="MOONCAKE_MASTER_START_FAILED")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL (tests of a dying master)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> "MooncakeMaster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
