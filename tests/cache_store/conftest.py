"""Fixtures of the cache store tests: unique store ids, real store processes on 127.0.0.1 port 0, and a final
check that no test left a segment behind in /dev/shm."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
# every store id used by these tests starts with this (one per pytest-xdist worker: a worker that finishes must not
# take another's live segments for leftovers)
TEST_ID_PREFIX = f"t{os.environ.get('PYTEST_XDIST_WORKER', '')}_"


def new_store_id() -> str:
    return f"{TEST_ID_PREFIX}{secrets.token_hex(6)}"


def leftover_files(store_id: str) -> list[str]:
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(f"qwenpd-{store_id}"))


def segment_files(store_id: str) -> list[Path]:
    return sorted(p for p in SHM.iterdir() if p.name.startswith(f"qwenpd-{store_id}-"))


def state_tensors(seed: int = 0, tokens: int = 7) -> dict[str, torch.Tensor]:
    """A small hybrid-like state: bf16 K/V and conv, fp32 recurrent (names as engine.state produces)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.3.k": torch.randn(2, tokens, 16, generator=g).bfloat16(),
        "layers.3.v": torch.randn(2, tokens, 16, generator=g).bfloat16(),
        "layers.0.conv": torch.randn(96, 3, generator=g).bfloat16(),
        "layers.0.recurrent": torch.randn(4, 16, 8, generator=g),
    }


def state_shapes(tokens: int) -> dict[str, tuple[int, ...]]:
    return {"layers.3.k": (2, tokens, 16), "layers.3.v": (2, tokens, 16), "layers.0.conv": (96, 3),
            "layers.0.recurrent": (4, 16, 8)}


STATE_DTYPES = {"layers.3.k": torch.bfloat16, "layers.3.v": torch.bfloat16, "layers.0.conv": torch.bfloat16,
                "layers.0.recurrent": torch.float32}


@dataclass
class StoreProcess:
    proc: subprocess.Popen
    address: str
    store_id: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_store(store_id: str, *args: str) -> StoreProcess:
    proc = subprocess.Popen([sys.executable, "-m", "qwenpd.cache_store", "--listen", "127.0.0.1:0", "--store-id", store_id,
                             "--grace", "1", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    m = re.search(r"serving on (\S+)", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"store did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    return StoreProcess(proc, m.group(1), store_id)


@pytest.fixture
def store_id() -> str:
    return new_store_id()


@pytest.fixture
def store_factory() -> Iterator:
    started: list[StoreProcess] = []

    def make(store_id: str | None = None, *args: str) -> StoreProcess:
        s = start_store(store_id or new_store_id(), *args)
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc.poll() is None:
            s.stop()


@pytest.fixture
def store(store_factory) -> StoreProcess:
    """A store with a 64 MiB budget in 4 MiB pooled segments."""
    return store_factory(None, "--budget", "64MiB", "--segment-size", "4MiB")


@pytest.fixture(scope="session", autouse=True)
def no_segments_left_behind() -> Iterator[None]:
    yield
    left = [p.name for p in SHM.iterdir() if p.name.startswith(f"qwenpd-{TEST_ID_PREFIX}")]
    for name in left:  # clean up so one failure does not leak memory, but fail loudly
        os.unlink(SHM / name)
    assert not left, f"tests left shared-memory files behind: {left}"
