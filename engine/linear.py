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

Batch invariance: a row's result must not depend on which other rows share the call, or a sequence decoded in a
batch of 8 and the same sequence replayed alone after a crash (decode_service/replay) part ways at the first
near-tie. oneDNN's packed kernels give every row the same bits for any row count from 2 on (checked from 2 to 300
rows, bf16 and fp32, tests/engine/test_linear.py), but take another path for a single row (its sums differ in the
last bits), and MKL's fp32 sgemm behind F.linear changes its blocking with the row count. So on CPU fp32 weights
are packed too, every call of one row runs as two (the row twice, one result kept: a decode step at batch 1 streams
the weight once either way), and a CPU without bf16 arithmetic uses the wide copy for every row count (it no
longer takes the narrow bf16 path for one row: about 2x the projection time at batch 1 on such a CPU, per the table
above, for one arithmetic at every batch size). On a CPU with AMX, oneDNN's bf16 kernels choose their blocking by
the row count, so no single count is safe to mix with another: there a bf16 weight is only ever called with 16..64
rows (`_row_window`: padded up, split into blocks; exactly 16 for a shape where the window's counts disagree).
Measured on a 2-vCPU Sapphire Rapids VM, `small` bf16: a decode step 8-12% slower at batch 1, 2-8% at batch 8,
1-5% at batch 32, a 2,048-token prefill 13% slower (the 64-row blocks read the weights more often); capping oneDNN
below AMX instead (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) made that prefill 3.2x slower. So where our own AMX kernel
loads (kernels/amx_linear: one fixed-order sum per output, batch invariant by construction) bf16 weights, and int8
ones, are packed for it instead and called with the rows as they come: faster than oneDNN at every row count
measured (docs/performance.md "Fourteenth round"); the window remains for an AMX CPU where it cannot be built.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenpd.kernels.amx_linear import (amx_linear, amx_linear_int8, available as amx_linear_available,
                                       pack_int8_weight, pack_weight as pack_amx_weight)
from qwenpd.kernels.int8_matmul import available as int8_matmul_available
from qwenpd.kernels.cpp_build import cpu_flags

PACKED_DTYPES = (torch.bfloat16, torch.float32)  # weight dtypes packed for oneDNN on CPU


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); read from /proc/cpuinfo (elsewhere: assume
    it does, which keeps the plain bf16 path)."""
    flags = cpu_flags()
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 tiles (oneDNN's kernels use them for bf16 matmuls: _row_window)."""
    flags = cpu_flags()
    return flags is not None and "amx_bf16" in flags


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True, slots=True)
class PackedCopies:
    narrow: torch.Tensor  # the weight in oneDNN's layout, its own dtype (or in amx_linear's: `amx`)
    wide: torch.Tensor | None  # an fp32 copy in oneDNN's layout (CPUs without bf16 arithmetic), else None
    window: tuple[int, int] | None = None  # the row counts every call takes (_row_window, in_window); None: any
    amx: int = 0  # the weight's output count where `narrow` is kernels/amx_linear's layout (its kernel: any rows)


_ONE_ROW_EXACT: dict[tuple, bool] = {}  # (out, in, dtype, wide) -> _one_row_exact
_ROW_WINDOWS: dict[tuple, tuple[int, int]] = {}  # (out, in, threads) -> the window of a bf16 weight on AMX
ROW_WINDOW = (16, 64)
FROM_TWO = (2, sys.maxsize)  # every count but one row alone (oneDNN's one-row kernel sums otherwise)


def _row_window(copies: PackedCopies, wide: bool) -> tuple[int, int] | None:
    """The row counts to call this weight with so that a row's bits never depend on the rows beside it. None (any
    count) where one row alone gets the bits it gets among others, else FROM_TWO (one row runs as two: docstring),
    but for a bf16 weight on a CPU with AMX: oneDNN's AMX kernels choose their blocking, and
    with it the order of the sums, by the row count (on a Sapphire Rapids VM a row of `small`'s down projection
    had other bits in calls of 8, 16 and 128 rows, and some shapes changed again at a few hundred rows), but
    calls of ROW_WINDOW's counts agree: there every call has 16..64 rows (tried once per shape and thread count on
    random rows, every count of the window), or exactly 16 where even those disagree."""
    w = copies.narrow
    if wide or w.dtype != torch.bfloat16 or not cpu_has_amx():
        return None if _one_row_exact(copies, wide) else FROM_TWO
    key = (*w.shape, torch.get_num_threads())
    if key not in _ROW_WINDOWS:
        lo, hi = ROW_WINDOW
        x = torch.randn(hi, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        whole = _linear_rows(x, copies, False)
        agree = all(torch.equal(_linear_rows(x[:m], copies, False), whole[:m]) for m in range(lo, hi))
        _ROW_WINDOWS[key] = ROW_WINDOW if agree else (lo, lo)
    return _ROW_WINDOWS[key]


def _one_row_exact(copies: PackedCopies, wide: bool) -> bool:
    """Whether one row multiplies to the same bits alone as among others, for this weight shape and dtype: tried
    once per shape on four random rows (the kernel oneDNN picks depends on shapes and dtypes only; where the
    one-row kernel differs, random rows differ in the last bits with near certainty). Where it does not, a
    decode step at batch 1 keeps oneDNN's faster one-row kernel."""
    w = copies.wide if wide else copies.narrow  # a packed copy keeps the weight's shape [out, in]
    out_features, in_features = w.shape
    key = (out_features, in_features, w.dtype, wide)
    if key not in _ONE_ROW_EXACT:
        x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
        many = _linear_rows(x, copies, wide)
        _ONE_ROW_EXACT[key] = all(torch.equal(_linear_rows(x[i:i + 1], copies, wide)[0], many[i]) for i in range(4))
    return _ONE_ROW_EXACT[key]


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
        x = x.float()
    if copies.window is None:
        return _linear_rows(x, copies, wide)
    y = in_window(x.reshape(-1, x.shape[-1]), copies.window, lambda rows: _linear_rows(rows, copies, wide))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def in_window(rows: torch.Tensor, window: tuple[int, int], fn) -> torch.Tensor:
    """fn over rows [M, in] called with window = (lo, hi) rows at a time only: blocks of hi rows, one of fewer than
    lo padded with zero rows (their outputs dropped)."""
    lo, hi = window
    if not rows.shape[0]:
        return fn(rows.new_zeros(lo, rows.shape[1]))[:0]
    out = []
    for start in range(0, rows.shape[0], hi):
        part = rows[start:start + hi]
        n = part.shape[0]
        if n < lo:
            part = torch.cat((part, part.new_zeros(lo - n, part.shape[1])))
        out.append(fn(part)[:n])
    return out[0] if len(out) == 1 else torch.cat(out)


def _linear_rows(x: torch.Tensor, copies: PackedCopies, wide: bool) -> torch.Tensor:
    if copies.amx:
        return amx_linear(x, copies.narrow, copies.amx)
    return torch.ops.mkldnn._linear_pointwise(x, copies.wide if wide else copies.narrow, None, "none", [], "")


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
    wide = wide and weight.dtype != torch.float32  # an fp32 weight is its own wide copy
    if weight.dtype == torch.bfloat16 and not wide and cpu_has_amx() and amx_linear_available():
        # our AMX kernel: every row count alike by construction, so no row window (and nothing to probe)
        _PACKED[handle] = PackedCopies(pack_amx_weight(weight), None, amx=weight.shape[0])
        _amx_fakes()
    else:
        copies = PackedCopies(torch.ops.mkldnn._reorder_linear_weight(weight, 1),
                              torch.ops.mkldnn._reorder_linear_weight(weight.float(), 1) if wide else None)
        _PACKED[handle] = dataclasses.replace(copies, window=_row_window(copies, wide))
    key = torch.tensor(handle, dtype=torch.int64).expand(weight.shape)
    weakref.finalize(key, _PACKED.pop, handle, None)
    return key


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A weight-only int8 projection (`--quantize int8`): W = q * scale[:, None], q int8 [out, in], one scale per
    output row, in the model dtype (the kernel multiplies by it as stored). Loaded, sliced for a tensor-parallel
    rank, fused and moved like a weight tensor (`cat`, `pad_rows`, `.to`)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def to(self, target: torch.dtype | torch.device | str) -> "Int8Weight":
        """A dtype casts the scales (q stays int8); a device moves both."""
        if isinstance(target, torch.dtype):
            return Int8Weight(self.q, self.scale.to(target))
        return Int8Weight(self.q.to(target), self.scale.to(target))

    def __getitem__(self, index: tuple) -> "Int8Weight":
        """A slice of rows (dim 0: their scales too) or of columns (dim 1: every row keeps its scale), as a
        tensor-parallel rank reads its shard."""
        dim = len(index) - 1
        if dim == 0:
            return Int8Weight(self.q[index], self.scale[index])
        return Int8Weight(self.q[index], self.scale)


def cat(parts: list, dim: int = 0):
    """torch.cat for weights: tensors, or Int8Weights (along rows: their scales too; along columns: the rows keep
    their scales, which must agree)."""
    if not isinstance(parts[0], Int8Weight):
        return torch.cat(parts, dim=dim)
    if not all(isinstance(p, Int8Weight) for p in parts):
        raise TypeError("cannot fuse int8 and unquantized weights into one projection")
    if dim == 1 and not all(torch.equal(p.scale, parts[0].scale) for p in parts):
        raise ValueError("int8 column slices of one weight carry its rows' scales: these differ")
    q = torch.cat([p.q for p in parts], dim=dim)
    return Int8Weight(q, torch.cat([p.scale for p in parts]) if dim == 0 else parts[0].scale)


def pad_rows(w, rows: int):
    """`rows` zero rows appended to a weight (an Int8Weight's: q 0, scale 1)."""
    if not isinstance(w, Int8Weight):
        return F.pad(w, (0, 0, 0, rows))
    return Int8Weight(F.pad(w.q, (0, 0, 0, rows)), F.pad(w.scale, (0, rows), value=1.0))


def held_bytes(w) -> int:
    """Bytes a weight holds (an Int8Weight's q and scales)."""
    return w.nbytes if isinstance(w, Int8Weight) else w.numel() * w.element_size()


CONVERTED_BYTES = 16 << 20  # prefill rows: weight rows converted from int8 at a time (_int8_linear)


def int8_step_kernel(x: torch.Tensor) -> str | None:
    """Which kernel multiplies decode-step rows x by int8 weights: "qwenpd-amx" (kernels/amx_linear: bf16 tiles on
    a CPU with AMX-BF16, prefill rows too; Linear packs the weight for it), "qwenpd" (kernels/int8_matmul: bf16 dot
    products on a CPU with AVX512-BF16 and AVX512-VBMI; both built on first use; their bits differ: the name goes
    into the weight fingerprint), else "aten" (aten's weight-only int8 kernel: bf16 on CPU
    where the input width is whole 16-lane vectors: torch 2.13's AVX512 kernel has no tail, reads past a row of
    another width and crashes; fp32 runs its scalar loop, ~11x slower), else None (the converted path)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return None
    if cpu_has_amx() and amx_linear_available():
        return "qwenpd-amx"
    if int8_matmul_available():
        return "qwenpd"
    if x.shape[-1] % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "aten"
    return None


def _int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, step: bool) -> torch.Tensor:
    """x [..., in] in the scales' dtype -> [..., out] in that dtype: sum_k x[k] (q[n, k] scale[n]) in fp32 (each
    product exact: a bf16 scale times |q| <= 127 fits fp32), rounded once to the model dtype on the int8 kernel's
    path, twice on the converted one (its matmul's output, then after the scale). Decode-step rows (`step`, bf16)
    on CPU: our int8 kernel (kernels/int8_matmul) where the CPU has it, else aten's weight-only int8 kernel
    (int8_step_kernel); both read the int8 weight itself (half the bytes of bf16: a decode step is bound by reading
    weights) and give each row the same bits whatever the row count. Prefill rows: the int8 values converted to
    the model dtype (exact: |q| <= 127) and multiplied by oneDNN's matmul, the scales applied to its output,
    CONVERTED_BYTES of converted weight rows at a time (a whole converted weight is a fresh allocation a call:
    1.7-3x slower on Qwen3.6-27B's MLP, and 356 MB for its gate_up); aten's int8 kernel has no blocking over rows
    and is 2.9x slower than this at 512 rows, ours reconverts the weights every 8 rows (docs/performance.md)."""
    rows = x.reshape(-1, x.shape[-1])
    kernel = int8_step_kernel(x) if step else None
    # with AMX, oneDNN's and aten's bf16 kernels sum in an order chosen by the row count: aten's in calls of exactly
    # 16 rows (its counts disagreed even within ROW_WINDOW), oneDNN's converted blocks packed and in their row window
    window = (16, 16) if x.dtype == torch.bfloat16 and x.device.type == "cpu" and cpu_has_amx() else None
    if kernel == "qwenpd-amx":
        raise ValueError("int8 weights for kernels/amx_linear are packed once, by Linear (amx8): not multiplied here")
    if kernel == "qwenpd":
        y = torch.ops.qwenpd_int8.int8_matmul(rows.contiguous(), q, scale)
    elif kernel == "aten":
        aten = lambda r: torch.ops.aten._weight_int8pack_mm(r.contiguous(), q, scale)  # noqa: E731
        y = (aten(rows) if window is None else in_window(rows, window, aten)).to(x.dtype)
    elif x.device.type == "cpu" and onednn_packing_available():  # oneDNN: every row count from 2 on alike
        y = rows.new_empty(rows.shape[0], q.shape[0])
        block = max(16, CONVERTED_BYTES // (q.shape[1] * rows.element_size()))  # fixed per weight: same bits
        for start in range(0, q.shape[0], block):
            w, block_window = q[start:start + block].to(x.dtype), FROM_TWO
            if window is not None:  # packed once for the block's calls, which take its shape's row window
                w = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                block_window = _row_window(PackedCopies(w, None), False)
            mm = lambda r: torch.ops.mkldnn._linear_pointwise(r, w, None, "none", [], "")  # noqa: E731
            part = in_window(rows, block_window, mm)
            y[:, start:start + block] = part.float() * scale[start:start + block].float()
    else:
        y = (F.linear(rows, q.to(x.dtype)).float() * scale.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


_lib.define("int8_linear(Tensor x, Tensor q, Tensor scale, bool step) -> Tensor")
_lib.impl("int8_linear", _int8_linear, "CPU")  # graphs call the eager kernels: the same bits compiled or not


@torch.library.register_fake("qwenpd::int8_linear")
def _(x, q, scale, step):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@functools.lru_cache(maxsize=1)
def _amx_fakes() -> None:
    """Shapes of kernels/amx_linear's own ops for graphs (registered once the kernel is loaded): a graph traces
    through its Python wrappers and calls the C++ kernel itself (a Python op would cost ~15 us a call at run
    time: a decode step of `small` makes 33)."""
    torch.library.register_fake("qwenpd_amx::linear_int8")(
        lambda x, packed, scale, n: x.new_empty(x.shape[0], n))
    torch.library.register_fake("qwenpd_amx::linear")(lambda x, packed, n: x.new_empty(x.shape[0], n))


class Linear:
    """y = x @ W^T, x rounded to the weight dtype first (activations elsewhere are fp32: the model rounds to bf16
    only at matmul inputs). A bf16 or fp32 weight on CPU is packed (module docstring), and every row's result is
    independent of the row count; on a CPU without bf16 arithmetic a bf16 weight multiplies in fp32 and returns
    fp32. `wide`: whether to keep that fp32 copy of a bf16 weight (default: detected); `weight` is None when packed
    and `key` finds the packed copies. An Int8Weight (`int8`) multiplies by `_int8_linear`: the call's `step` says
    whether its rows are decode-step tokens (a decode step's or a speculative verify pass's), which take the int8
    kernel; other weights ignore it. Where the int8 kernel is kernels/amx_linear's (a CPU with AMX-BF16) the int8
    weight is packed for it (`amx8`) and every row count takes it, decode steps and prefill rows alike."""

    __slots__ = ("weight", "key", "dtype", "wide", "int8", "amx8", "_copies")

    def __init__(self, weight: "torch.Tensor | Int8Weight", wide: bool | None = None):
        self.int8 = weight if isinstance(weight, Int8Weight) else None
        self.amx8 = 0  # int8 packed for kernels/amx_linear: its output count (q is pack_int8_weight's layout)
        if self.int8 is not None:
            q, scale = weight.q.contiguous(), weight.scale.contiguous()
            if int8_step_kernel(torch.empty(0, q.shape[1], dtype=scale.dtype, device=q.device)) == "qwenpd-amx":
                q, self.amx8 = pack_int8_weight(q), q.shape[0]  # every row count takes the AMX kernel
                _amx_fakes()
            self.int8 = Int8Weight(q, scale)
            self.dtype, self.wide, self.key, self._copies, self.weight = weight.scale.dtype, False, None, None, None
            return
        weight = weight.contiguous()
        self.dtype = weight.dtype
        packable = weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and onednn_packing_available()
        self.wide = packable and weight.dtype == torch.bfloat16 and (not cpu_has_bf16() if wide is None else wide)
        self.key = pack(weight, self.wide) if packable else None
        self._copies = _PACKED[int(self.key[0, 0])] if packable else None
        self.weight = None if packable else weight

    def __call__(self, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.amx8:  # (graphs trace through the wrapper to the kernel's C++ op: _amx_fakes)
            return amx_linear_int8(x, self.int8.q, self.int8.scale, self.amx8)
        if self.int8 is not None:
            if torch.compiler.is_compiling() and x.device.type == "cpu":
                return torch.ops.qwenpd.int8_linear(x, self.int8.q, self.int8.scale, step)
            return _int8_linear(x, self.int8.q, self.int8.scale, step)
        if self.key is None:
            return F.linear(x, self.weight)
        if self._copies.amx:  # our AMX kernel, in graphs too (the packed weight an input, like a weight)
            return amx_linear(x, self._copies.narrow, self._copies.amx)
        if torch.compiler.is_compiling():  # graphs call the op: the key stands in for the packed copies
            return torch.ops.qwenpd.packed_linear(x, self.key, self.wide)
        # eager: the op's kernel without its dispatch into Python and the key's lookup (~15 us a call; a decode
        # step of `small` makes 33)
        return _linear(x, self._copies, self.wide)
