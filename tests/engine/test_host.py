"""The CPU engine's process memory (engine/host.py): its weights on huge pages, and a prefill chunk reusing the
pages the chunk before it freed instead of page-faulting fresh zero-filled ones; unless the user chose
otherwise."""

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
import json, os, resource, sys
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
huge = [int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(json.dumps({"tuned": host.keep_freed_memory(), "faults": faults, "huge_kb": huge[0] if huge else 0,
                  "huge_pages_env": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """`small`'s widths (activations of MBs a chunk), 4 layers."""
    return init_model(tmp_path_factory.mktemp("host") / "m", "small", dtype="bfloat16", num_layers=4)


def _prefill_faults(model, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                             "LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")}
    run = subprocess.run([sys.executable, "-c", CHECK, str(model)], capture_output=True, text=True, timeout=300,
                         env={**clean, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_weights_on_huge_pages_and_a_prefill_reuses_the_memory_the_one_before_freed(wide_model):
    """After the first two prefills, another of the same length page-faults (almost) nothing: 512 tokens of `small`'s
    widths free and allocate ~190 MB a prefill, which glibc's defaults give back to the system and fault in again
    every time (the second case: a user's own MALLOC_TRIM_THRESHOLD_ leaves glibc as set, and shows the churn).
    The weights (~170 MB here) sit on huge pages where the kernel has them, unless the user's environment says no."""
    tuned = _prefill_faults(wide_model)
    assert tuned["tuned"] and tuned["huge_pages_env"] == "1"
    if _thp_mode() != "never":
        assert tuned["huge_kb"] > 100_000, tuned
    assert max(tuned["faults"][2:]) < 4000, tuned  # < 16 MB of fresh pages once the heap has settled
    user = _prefill_faults(wide_model, MALLOC_TRIM_THRESHOLD_="131072", THP_MEM_ALLOC_ENABLE="0")
    assert not user["tuned"] and user["huge_pages_env"] == "0"
    if _thp_mode() == "madvise":  # huge pages only where asked for
        assert user["huge_kb"] < 10_000, user
    assert min(user["faults"][2:]) > 10_000, user
