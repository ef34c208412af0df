"""Projections: y = x @ W^T, with the weight prepacked once for the CPU's fastest matmul.

oneDNN multiplies fastest by a weight reordered into its blocked layout, but the reordered copy is an opaque
MKLDNN tensor that torch.compile cannot trace. So the packed copies live in a table, and eager code and compiled
graphs alike call one op, `qwenpd::packed_linear(x, key, wide)`: `key` stands in for the weight, an int64 handle
to the copies viewed with the weight's shape (graphs trace the right shapes; one element of storage). Graphs of
every layer of a kind stay one region: the key is an input like any weight.

Every projection of `small` once (282 MB of bf16 weights), Ice Lake-SP with no bf16 instructions, 2 threads:

    rows | packed bf16 | F.linear bf16 | packed fp32 | F.linear fp32
    1    | 12.8 ms     | 18.4 ms       | 24.2 ms     | 18.9 ms
    2    | 26.8        | 23.1          | 25.3        | 20.8
    8    | 52.2        | 64.4          | 29.3        | 54.6
    32   |             |               | 50.0        | 65.9
    2048 |             |               | 1948        | 1948

One row streams the packed bf16 weight at 22 GB/s (88% of the read bandwidth measured beside it). From two rows
on, a CPU without bf16 arithmetic (no AVX512-BF16, no AMX) converts bf16 to fp32 inside the kernel and is bound by
that: the packed fp32 copy (`wide`) is faster from 2 rows on, 1.8x at 8. It multiplies the same bf16-rounded
inputs (their products are exact in fp32) with fp32 sums, and its output stays fp32: the model rounds to bf16 only
at matmul inputs. A CPU with bf16 arithmetic keeps the packed bf16 weight for every row count; other devices
multiply by the plain weight (F.linear).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# From this many rows on, a CPU without bf16 instructions multiplies by the packed fp32 copy (table above).
WIDE_ROWS = 2


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); read from /proc/cpuinfo (elsewhere: assume
    it does, which keeps the plain bf16 path)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True, slots=True)
class PackedCopies:
    narrow: torch.Tensor  # the weight in oneDNN's layout, its own dtype
    wide: torch.Tensor | None  # an fp32 copy in oneDNN's layout (CPUs without bf16 arithmetic), else None


_PACKED: dict[int, PackedCopies] = {}  # handle -> the copies; an entry lives as long as its key
_handles = itertools.count(1)

_lib = torch.library.Library("qwenpd", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor key, bool wide) -> Tensor")


def _packed_linear_cpu(x: torch.Tensor, key: torch.Tensor, wide: bool) -> torch.Tensor:
    copies = _PACKED.get(int(key[0, 0]))  # key [out, in]: every element is the handle
    if copies is None:
        raise ValueError("qwenpd::packed_linear: no packed weight is registered for this key")
    return _linear(x, copies, wide)


def _linear(x: torch.Tensor, copies: PackedCopies, wide: bool) -> torch.Tensor:
    if wide:
        return torch.ops.mkldnn._linear_pointwise(x.float(), copies.wide, None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, copies.narrow, None, "none", [], "")


# A Library kernel, not torch.library.custom_op: its Python wrapper costs ~15 us a call against ~3 us here, and a
# decode step makes 4 calls per layer.
_lib.impl("packed_linear", _packed_linear_cpu, "CPU")


@torch.library.register_fake("qwenpd::packed_linear")
def _(x, key, wide):
    return x.new_empty(*x.shape[:-1], key.shape[0], dtype=torch.float32 if wide else x.dtype)


def pack(weight: torch.Tensor, wide: bool) -> torch.Tensor:
    """Register the packed copies of a CPU weight [out, in]; returns the key that finds them: their handle, int64,
    viewed as [out, in]. The copies are dropped with the key."""
    handle = next(_handles)
    _PACKED[handle] = PackedCopies(torch.ops.mkldnn._reorder_linear_weight(weight, 1),
                                   torch.ops.mkldnn._reorder_linear_weight(weight.float(), 1) if wide else None)
    key = torch.tensor(handle, dtype=torch.int64).expand(weight.shape)
    weakref.finalize(key, _PACKED.pop, handle, None)
    return key


class Linear:
    """y = x @ W^T, x rounded to the weight dtype first (activations elsewhere are fp32: the model rounds to bf16
    only at matmul inputs). A bf16 weight on CPU is packed (module docstring); on a CPU without bf16 arithmetic,
    inputs of WIDE_ROWS rows or more multiply in fp32 and return fp32, fewer rows return the weight dtype. `wide`:
    whether to keep that fp32 copy (default: detected); `weight` is then None and `key` finds the packed copies."""

    __slots__ = ("weight", "key", "dtype", "wide", "_copies")

    def __init__(self, weight: torch.Tensor, wide: bool | None = None):
        weight = weight.contiguous()
        self.dtype = weight.dtype
        packable = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and onednn_packing_available()
        self.wide = packable and (not cpu_has_bf16() if wide is None else wide)
        self.key = pack(weight, self.wide) if packable else None
        self._copies = _PACKED[int(self.key[0, 0])] if packable else None
        self.weight = None if packable else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.key is None:
            return F.linear(x, self.weight)
        wide = self.wide and x.numel() >= WIDE_ROWS * x.shape[-1]
        if torch.compiler.is_compiling():  # graphs call the op: the key stands in for the packed copies
            return torch.ops.qwenpd.packed_linear(x, self.key, wide)
        # eager: the op's kernel without its dispatch into Python and the key's lookup (~15 us a call; a decode
        # step of `small` makes 33)
        return _linear(x, self._copies, wide)
