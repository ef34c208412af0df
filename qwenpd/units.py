"""Sizes given on the command line: byte counts with units, and the KV cache's size (bytes or a fraction of free
device memory). Plain Python, used by every part that declares such a flag (the engine's, the servers')."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512M', '1_000_000' -> bytes (binary units for K/M/G/T without 'B')."""
    m = re.fullmatch(r"\s*([0-9_]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 4GiB, 512MiB, 1048576)")
    return int(float(m.group(1).replace("_", "")) * _UNITS[m.group(2).lower()])


def parse_kv_cache_size(text: str) -> int | float:
    """--kv-cache-bytes: a byte size ('8GiB', '1048576' -> int) or a fraction of the device memory free once the
    weights are loaded ('0.9', '90%' -> float in (0, 1]); a plain number with a decimal point is a fraction."""
    m = re.fullmatch(r"\s*([0-9]*\.[0-9]+|[0-9]+(?:\.[0-9]*)?)\s*(%?)\s*", text)
    if m and (m.group(2) or "." in m.group(1)):
        fraction = float(m.group(1)) / (100 if m.group(2) else 1)
        if not 0.0 < fraction <= 1.0:
            raise argparse.ArgumentTypeError(f"a KV cache fraction must be in (0, 1] (or (0%, 100%]), got {text!r}")
        return fraction
    try:
        size = parse_bytes(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a KV cache size: {text!r} (a byte size such as 8GiB, or a fraction "
                                         "of free device memory such as 0.9 or 90%)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"a KV cache size must be at least 1 byte, got {text!r}")
    return size
