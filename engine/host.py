"""The host process's memory, tuned for a CPU engine: weights on huge pages, freed activations kept.

Huge pages. A decode step at batch 1 streams every weight once (282 MB for `small`); on 4 KB pages that is ~70,000
TLB misses a step. torch puts its CPU allocations of 2 MB and more on transparent huge pages when
THP_MEM_ALLOC_ENABLE=1 is in the environment at its first allocation; the packed oneDNN weights are such
allocations. Measured on `small` bf16 here (6 processes a side, medians): every projection once 13.3 -> 10.8-12.5
ms, decode b1 20.2 -> 18.2 ms a step after 128 tokens, 19.7 -> 17.8 after 512. So importing qwenpd.engine sets
it (prefer_huge_pages) unless the environment says otherwise; where torch has allocated before that import, it
stays as it was. Allocations of 2 MB and more are then 2 MB aligned, and the kernel backs them with huge pages
where it has them (THP "always" or "madvise").

Freed memory. A prefill chunk allocates and frees tensors of many sizes from a few hundred KB to tens of MB
(fp32 activations of [chunk, intermediate] and the like). With glibc's defaults, such a chunk is served by mmap,
or the heap is trimmed back to the system whenever its free top passes a threshold that glibc keeps moving; either
way the next chunk touches fresh pages and the kernel zero-fills them one page fault at a time. Measured on
`small` bf16, a 512-token prefill took ~48,000 minor page faults (190 MB zero-filled) every time, ~14% of its wall
time; with the settings below, none after the first.

So a CPU engine asks glibc, once per process, to serve chunks up to 32 MiB (the most glibc allows) from the heap
and to keep up to 1 GiB of freed heap instead of returning it. The process keeps its peak of activations
mapped, which a serving process reaches again with its next long prompt anyway. Nothing is changed where the
user chose the allocator: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, a GLIBC_TUNABLES malloc setting, or a
preloaded allocator (LD_PRELOAD, e.g. jemalloc or tcmalloc) leave glibc as they set it; so does a C library
other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit hosts
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # read by torch (c10's CPU allocator) once, at its first allocation

_tuned: bool | None = None  # None: not tried yet in this process


def prefer_huge_pages() -> None:
    """Ask torch for huge pages under its large CPU allocations (module docstring), unless the environment
    already says; takes effect only before torch's first allocation in this process."""
    os.environ.setdefault(HUGE_PAGES, "1")


def keep_freed_memory() -> bool:
    """Apply the settings of the module docstring, once per process; whether they are in effect."""
    global _tuned
    if _tuned is None:
        _tuned = _apply()
    return _tuned


def _apply() -> bool:
    if any(os.environ.get(name) for name in USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
