"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_description() -> str:
    """'<model name>, bf16 ISA: AMX | AVX512-BF16 | none (torch kernels: <capability>)' from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none"
    return f"{model}, bf16 ISA: {isa} (torch CPU kernels: {torch.backends.cpu.get_cpu_capability()})"
