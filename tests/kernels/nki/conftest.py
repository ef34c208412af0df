"""NKI tests: one BLAS thread for NumPy and one intra-op thread for torch while they run.

The emulator does thousands of 128 x 128 float32 matmuls and the reference loops over tokens with small torch
ops; threads buy nothing at these sizes, and on a shared 2-core machine spinning worker threads made the suite
~8x slower under load. Best effort for NumPy: its wheels bundle scipy-openblas; other builds are left alone.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
import torch


def _numpy_openblas():
    pattern = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*.so")
    for path in glob.glob(pattern):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "scipy_openblas_set_num_threads64_") and hasattr(lib, "scipy_openblas_get_num_threads64_"):
            return lib
    return None


@pytest.fixture(scope="package", autouse=True)
def single_threaded_math():
    lib, torch_threads = _numpy_openblas(), torch.get_num_threads()
    blas_threads = lib.scipy_openblas_get_num_threads64_() if lib else None
    torch.set_num_threads(1)
    if lib:
        lib.scipy_openblas_set_num_threads64_(1)
    yield
    torch.set_num_threads(torch_threads)
    if lib:
        lib.scipy_openblas_set_num_threads64_(blas_threads)
