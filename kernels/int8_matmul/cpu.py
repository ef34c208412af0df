"""Load the CPU kernel (cpu.cpp) on first use (kernels/cpp_build.py builds it).

The kernel needs AVX512-BF16 (bf16 dot products) and AVX512-VBMI (the byte-table conversion); a CPU without them,
or a machine without a C++ compiler, has no kernel (`load()` returns False and says why once), and decode steps of
int8 weights take aten's weight-only kernel instead (engine/linear.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from qwenpd.kernels.cpp_build import load_cpu_kernel

SOURCE = Path(__file__).with_name("cpu.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi", "bmi2", "fma")
COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                 "-mavx512vbmi", "-mbmi2", "-mfma"]
DISABLE_ENV = "QWENPD_INT8_KERNEL"  # "0": never build or use it (aten's kernel then; for comparisons)

why_not = ""  # why load() found no kernel, once it has run


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Whether `torch.ops.qwenpd_int8.int8_matmul` is there: built (or found built) and loaded in this process."""
    global why_not
    why_not = load_cpu_kernel("qwenpd_int8_matmul", SOURCE, CPU_FLAGS, COMPILE_FLAGS, DISABLE_ENV,
                              "int8 decode kernel", "decode steps take aten's int8 kernel")
    if why_not:
        return False
    return hasattr(torch.ops.qwenpd_int8, "int8_matmul")
