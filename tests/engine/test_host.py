"""The CPU engine's process keeps freed activation memory (engine/host.py): a prefill chunk reuses the pages the
chunk before it freed instead of page-faulting fresh zero-filled ones, unless the user chose the allocator."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from qwenpd.engine.init_model import init_model

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator")

CHECK = """
import json, resource, sys
from qwenpd.engine import host
from qwenpd.engine.engine import Engine

engine = Engine(sys.argv[1], dtype="bfloat16")
ids = [1 + i % 1000 for i in range(512)]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _, state = engine.prefill(ids)
    state.release()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": host.keep_freed_memory(), "faults": faults}))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """`small`'s widths (activations of MBs a chunk), 4 layers."""
    return init_model(tmp_path_factory.mktemp("host") / "m", "small", dtype="bfloat16", num_layers=4)


def _prefill_faults(model, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                             "LD_PRELOAD", "GLIBC_TUNABLES")}
    run = subprocess.run([sys.executable, "-c", CHECK, str(model)], capture_output=True, text=True, timeout=300,
                         env={**clean, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_a_prefill_reuses_the_memory_the_one_before_freed(wide_model):
    """After the first two prefills, another of the same length page-faults (almost) nothing: 512 tokens of `small`'s
    widths free and allocate ~190 MB a prefill, which glibc's defaults give back to the system and fault in again
    every time (the second case: a user's own MALLOC_TRIM_THRESHOLD_ leaves glibc as set, and shows the churn)."""
    tuned = _prefill_faults(wide_model)
    assert tuned["tuned"]
    assert max(tuned["faults"][2:]) < 1000, tuned  # < 4 MB of fresh pages once the heap has settled
    user = _prefill_faults(wide_model, MALLOC_TRIM_THRESHOLD_="131072")
    assert not user["tuned"]
    assert min(user["faults"][2:]) > 10_000, user
