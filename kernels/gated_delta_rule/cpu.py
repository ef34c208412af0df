"""Load the CPU kernel of a decode step's state update (cpu_step.cpp) on first use (kernels/cpp_build.py builds
it, ~10 s once a machine). A CPU without FMA, or a machine without a C++ compiler, has none (`load()` returns False
and says why in `why_not`); step.py's step_state then runs its torch code.

The build's vector width follows the CPU (AVX-512 or AVX2, each its own build); the bits do not (cpu_step.cpp).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from qwenpd.kernels.cpp_build import load_kernel, missing_cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_step.cpp")
DISABLE_ENV = "QWENPD_DELTA_KERNEL"  # "0": never build or use it (the torch code then; for comparisons)
BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]  # the fmas are written out: the same bits at every width

why_not = ""  # why load() found no kernel, once it has run
# load() succeeded in this process: what step_state and step_states read (a plain global, also inside a graph), and
# what decides whether a verify pass runs in two parts (engine/speculative.py _split_kernels)
ready = False


def _variant() -> tuple[str, list[str]] | None:
    if not missing_cpu_flags(("avx512f", "fma")):
        return "avx512", ["-mavx512f", "-mfma"]
    if not missing_cpu_flags(("avx2", "fma")):
        return "avx2", ["-mavx2", "-mfma"]
    return None


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Whether `torch.ops.qwenpd_delta.step_state` is there: built (or found built) and loaded in this process."""
    global why_not, ready
    if os.environ.get(DISABLE_ENV, "1") == "0":
        why_not = f"{DISABLE_ENV}=0"
        return False
    variant = _variant()
    if variant is None:
        why_not = "this CPU has neither AVX-512 nor AVX2 with FMA"
        return False
    name, flags = variant
    why_not = load_kernel(f"qwenpd_delta_step_{name}", SOURCE, BASE_FLAGS + flags)
    if why_not:
        log.warning("delta-rule step kernel: %s; decode steps take the torch code", why_not)
        return False
    torch.library.register_fake("qwenpd_delta::step_state")(_fake)  # what torch.compile traces
    ready = True
    return ready


def _fake(qk, qdotk, decay, beta, v, state):
    return torch.empty_like(v)
