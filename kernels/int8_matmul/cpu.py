"""Build and load the CPU kernel (cpu.cpp) on first use: torch's C++ extension build, cached on disk.

The kernel needs AVX512-BF16 (bf16 dot products) and AVX512-VBMI (the byte-table conversion); a CPU without them,
or a machine without a C++ compiler, has no kernel (`load()` returns False and says why once), and decode steps of
int8 weights take aten's weight-only kernel instead (engine/linear.py). The first build takes ~10 s on 2 cores;
torch keeps it under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), in a folder named by the torch
version; ninja rebuilds it when the source or the flags change. Processes started together build it once
(`_build`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi", "bmi2", "fma")
COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                 "-mavx512vbmi", "-mbmi2", "-mfma"]
DISABLE_ENV = "QWENPD_INT8_KERNEL"  # "0": never build or use it (aten's kernel then; for comparisons)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags, from /proc/cpuinfo; None where that cannot be read (engine/linear.py asks too)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None


def missing_cpu_flags() -> tuple[str, ...]:
    flags = cpu_flags()
    return CPU_FLAGS if flags is None else tuple(flag for flag in CPU_FLAGS if flag not in flags)


def _ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; the ninja wheel (a dependency) may sit in a venv that is not on it."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


why_not = ""  # why load() found no kernel, once it has run


def _build(cpp_extension, name: str) -> None:
    """torch's loader under a lock of ours. torch serializes builders with a lock *file* and waits, without end,
    while one exists, so a builder killed mid-build (a service restarted while loading) would hang every later
    load. An flock is released by the kernel when its holder dies: whoever holds it is the only builder alive,
    and a lock file it finds is a dead builder's."""
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))  # a private helper of torch's
    except (AttributeError, OSError):
        build_dir = None
    with open(build_dir / "qwenpd.flock", "a") if build_dir else contextlib.nullcontext() as held:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink(missing_ok=True)
                log.warning("int8 decode kernel: removed a dead builder's lock %s", stale)
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=COMPILE_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Whether `torch.ops.qwenpd_int8.int8_matmul` is there: built (or found built) and loaded in this process."""
    global why_not
    if os.environ.get(DISABLE_ENV, "1") == "0":
        why_not = f"{DISABLE_ENV}=0"
        return False
    missing = missing_cpu_flags()
    if missing:
        why_not = "this CPU lacks " + ", ".join(missing)
        log.info("int8 decode kernel: %s; decode steps take aten's int8 kernel", why_not)
        return False
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()

        # one build per torch version: a build against another libtorch may load and then misbehave
        name = "qwenpd_int8_matmul_torch" + re.sub(r"\W", "_", torch.__version__)
        _build(cpp_extension, name)
    except Exception as e:  # no compiler, no ninja, a broken toolchain: the engine still serves, on aten's kernel
        why_not = f"could not build {SOURCE.name}: " + (str(e).splitlines()[0] if str(e) else type(e).__name__)
        log.warning("int8 decode kernel: %s; decode steps take aten's int8 kernel", why_not)
        return False
    return hasattr(torch.ops.qwenpd_int8, "int8_matmul")
