"""Build and load this package's C++ CPU kernels on first use: torch's C++ extension build, cached on disk.

A kernel is one .cpp file registering its ops with TORCH_LIBRARY; `load_kernel` builds it (~10 s on 2 cores the
first time on a machine), loads it into the process and says why not where it cannot (no compiler, no ninja, a
broken toolchain: the caller then runs its torch code). torch keeps builds under $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions), in a folder named by the kernel, its flags' variant and the torch version; ninja
rebuilds one when its source or flags change. Processes started together build it once (`_build`). Used by
kernels/int8_matmul/cpu.py, kernels/amx_linear/cpu.py and kernels/gated_delta_rule/cpu.py.
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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags, from /proc/cpuinfo; None where that cannot be read (engine/linear.py asks too)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None


def missing_cpu_flags(needed: tuple[str, ...]) -> tuple[str, ...]:
    flags = cpu_flags()
    return needed if flags is None else tuple(flag for flag in needed if flag not in flags)


def _ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; the ninja wheel (a dependency) may sit in a venv that is not on it."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def _build(cpp_extension, name: str, source: Path, cflags: list[str]) -> None:
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
                log.warning("C++ kernel %s: removed a dead builder's lock %s", name, stale)
        cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)


def load_kernel(stem: str, source: Path, cflags: list[str]) -> str:
    """Build (or find built) and load `source` as `stem` (one build per torch version: a build against another
    libtorch may load and then misbehave); returns "" once loaded, else why it could not be."""
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        _build(cpp_extension, stem + "_torch" + re.sub(r"\W", "_", torch.__version__), source, cflags)
    except Exception as e:  # no compiler, no ninja, a broken toolchain: the caller's torch code serves instead
        return f"could not build {source.name}: " + (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return ""


def load_cpu_kernel(stem: str, source: Path, cpu_flags_needed: tuple[str, ...], cflags: list[str], disable_env: str,
                    what: str, instead: str) -> str:
    """load_kernel for a kernel that needs some CPU flags and that `disable_env`=0 switches off: "" once loaded,
    else why not (logged: `what` could not load, `instead` serves)."""
    if os.environ.get(disable_env, "1") == "0":
        return f"{disable_env}=0"
    missing = missing_cpu_flags(cpu_flags_needed)
    if missing:
        why = "this CPU lacks " + ", ".join(missing)
        log.info("%s: %s; %s", what, why, instead)
        return why
    why = load_kernel(stem, source, cflags)
    if why:
        log.warning("%s: %s; %s", what, why, instead)
    return why
