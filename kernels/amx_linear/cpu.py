"""Load the AMX projection kernel (amx.cpp) on first use (kernels/cpp_build.py builds it, ~10 s once a machine).

Only a CPU with AMX-BF16 (and AVX512-BF16/VBMI for the rounding and the int8 conversion) has it; elsewhere, or
without a C++ compiler, or with QWENPD_AMX_LINEAR=0, `load()` is False and says why once (engine/linear.py then
multiplies by oneDNN, in its row window, and int8 by kernels/int8_matmul).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from qwenpd.kernels.cpp_build import load_cpu_kernel

SOURCE = Path(__file__).with_name("amx.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "bmi2", "amx_tile", "amx_bf16")
COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi", "-mbmi2",
                 "-mamx-tile", "-mamx-bf16"]
DISABLE_ENV = "QWENPD_AMX_LINEAR"  # "0": never build or use it (oneDNN in its row window then; for comparisons)

why_not = ""  # why load() found no kernel, once it has run


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Whether `torch.ops.qwenpd_amx.linear` is there: built (or found built) and loaded in this process."""
    global why_not
    why_not = load_cpu_kernel("qwenpd_amx_linear", SOURCE, CPU_FLAGS, COMPILE_FLAGS, DISABLE_ENV,
                              "AMX projection kernel", "bf16 projections take oneDNN in its row window")
    if why_not:
        return False
    return hasattr(torch.ops.qwenpd_amx, "linear")
