"""The model's non-plain-torch math as torch custom ops in one namespace, `qwenpd::`.

Each op has a fake (meta) implementation, so torch.compile traces it with static shapes and the meta device runs
it; the default kernel (every device) is the torch code in this package, which stays the reference. Per-device
kernels are added on top: the NKI kernels on neuron (kernels/nki, registered when torch-neuronx is imported:
`register_device_kernels`). flash-linear-attention's chunked CUDA kernel is an op of its own
(qwenpd::fla_chunk_gated_delta_rule), which an engine chooses with deltanet_kernels="fla".

    qwenpd::chunk_gated_delta_rule(q, k, v, g, beta, initial_state, mask?) -> (o, final_state)
    qwenpd::step_gated_delta_rule(q, k, v, g, beta, state!) -> o                 (state updated in place)
    qwenpd::causal_conv1d(x, weight, state, mask?) -> (y, new_state)
    qwenpd::causal_conv1d_update(x, weight, state!) -> y                          (state updated in place)
    qwenpd::write_kv(k_pool!, v_pool!, slots, k, v) -> ()
    qwenpd::paged_attention_prefill(q, k_pool, v_pool, block_table, start, scale) -> o
    qwenpd::paged_attention_decode(q, k_pool, v_pool, block_tables, context_lens, scale) -> o

The decode step calls the last four through `decode_*` (below): on CPU and CUDA their torch code directly; a
prompt chunk calls the others through `prefill_*`: their torch code directly where nothing is being compiled.

Shapes are those of the torch functions named alike (kernels.gated_delta_rule, kernels.causal_conv1d,
kernels.paged_attention). A `mask` [B, T] marks real tokens and must be a prefix (padding at the end only): padded
tokens leave every state as it was.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qwenpd.kernels import paged_attention as pa
from qwenpd.kernels.causal_conv1d import causal_conv1d as _conv, causal_conv1d_update as _conv_update
from qwenpd.kernels.gated_delta_rule import chunk_gated_delta_rule as _chunk, step_gated_delta_rule as _step

NAMESPACE = "qwenpd"


# ---- gated delta rule -------------------------------------------------------------------------------------------
@torch.library.custom_op("qwenpd::chunk_gated_delta_rule", mutates_args=())
def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor,
                           mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [B, Hv, K, V] fp32; mask [B, T] bool.
    Returns o [B, T, Hv, V] (v.dtype) and the final state [B, Hv, K, V] fp32."""
    return _chunk_code(q, k, v, g, beta, initial_state, mask)


def _chunk_code(q, k, v, g, beta, initial_state, mask=None):
    return _chunk(q, k, v, g, beta, initial_state=initial_state, mask=mask)


@chunk_gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state, mask=None):
    return torch.empty_like(v), initial_state.new_empty(initial_state.shape, dtype=torch.float32)


@torch.library.custom_op("qwenpd::step_gated_delta_rule", mutates_args=("state",))
def step_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """q, k [B, Hk, K]; v [B, Hv, V]; g, beta [B, Hv]; state [B, Hv, K, V] fp32 updated in place.
    Returns o [B, Hv, V]."""
    return _step(q, k, v, g, beta, state)


@step_gated_delta_rule.register_fake
def _(q, k, v, g, beta, state):
    return torch.empty_like(v)


# flash-linear-attention's chunked kernel (CUDA only; tf32 inside, so close to but not bit-equal with the torch
# code): an op of its own, chosen per engine (`deltanet_kernels="fla"`), never silently in place of the reference.
# FLA's fused recurrent step is not used: on an H200 (FLA 0.6.0) its state diverged from the reference within
# 20 steps (kernels/fla.py check_equal reports it), so decode steps stay on qwenpd::step_gated_delta_rule.
@torch.library.custom_op("qwenpd::fla_chunk_gated_delta_rule", mutates_args=())
def fla_chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor,
                               mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """chunk_gated_delta_rule's contract, computed by flash-linear-attention (kernels/fla.py)."""
    from qwenpd.kernels import fla

    return fla.fla_chunk(q, k, v, g, beta, initial_state, mask)


@fla_chunk_gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state, mask=None):
    return torch.empty_like(v), initial_state.new_empty(initial_state.shape, dtype=torch.float32)


# ---- causal conv1d ----------------------------------------------------------------------------------------------
def last_inputs(x: Tensor, state: Tensor, lengths: Tensor) -> Tensor:
    """The last W-1 real inputs of [state, x[:, :lengths[b]]] per sequence: [B, D, W-1] (no host sync)."""
    keep = state.shape[-1]
    history = torch.cat([state, x.transpose(1, 2).to(state.dtype)], dim=-1)  # [B, D, W-1+T]
    idx = lengths[:, None] + torch.arange(keep, device=x.device)  # [B, W-1]
    return history.gather(-1, idx[:, None, :].expand(-1, history.shape[1], -1))


@torch.library.custom_op("qwenpd::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, state: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [B, T, D]; weight [D, W]; state [B, D, W-1]; mask [B, T] bool (a prefix). SiLU. Returns y [B, T, D] and
    the new state [B, D, W-1] after the real tokens."""
    return _conv_code(x, weight, state, mask)


def _conv_code(x, weight, state, mask=None):
    y, new_state = _conv(x, weight, state)
    if mask is not None:
        new_state = last_inputs(x, state, mask.sum(-1))
    return y, new_state


@causal_conv1d.register_fake
def _(x, weight, state, mask=None):
    return torch.empty_like(x), torch.empty_like(state)


@torch.library.custom_op("qwenpd::causal_conv1d_update", mutates_args=("state",))
def causal_conv1d_update(x: Tensor, weight: Tensor, state: Tensor) -> Tensor:
    """x [B, D]; weight [D, W]; state [B, D, W-1] updated in place. SiLU. Returns y [B, D]."""
    return _conv_update(x, weight, state)


@causal_conv1d_update.register_fake
def _(x, weight, state):
    return torch.empty_like(x)


# ---- paged attention ------------------------------------------------------------------------------------------
@torch.library.custom_op("qwenpd::write_kv", mutates_args=("k_pool", "v_pool"))
def write_kv(k_pool: Tensor, v_pool: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """k, v [N, Hkv, D] into pools [num_pages, Hkv, page_size, D] at flat slots [N] int64."""
    pa.write_kv(k_pool, v_pool, slots, k, v)


@write_kv.register_fake
def _(k_pool, v_pool, slots, k, v):
    return None


@torch.library.custom_op("qwenpd::paged_attention_prefill", mutates_args=())
def paged_attention_prefill(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, start: Tensor,
                            scale: float) -> Tensor:
    """q [T, Hq, D] at positions start..; block_table [W] int64; start [1] int64. Returns o [T, Hq, D]."""
    return pa.paged_attention_prefill(q, k_pool, v_pool, block_table, start, scale)


@paged_attention_prefill.register_fake
def _(q, k_pool, v_pool, block_table, start, scale):
    return torch.empty_like(q)


@torch.library.custom_op("qwenpd::paged_attention_decode", mutates_args=())
def paged_attention_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor,
                           scale: float) -> Tensor:
    """q [B, Hq, D]; block_tables [B, W] int64; context_lens [B] int64. Returns o [B, Hq, D]."""
    return pa.paged_attention_decode(q, k_pool, v_pool, block_tables, context_lens, scale)


@paged_attention_decode.register_fake
def _(q, k_pool, v_pool, block_tables, context_lens, scale):
    return torch.empty_like(q)


# ---- the decode step's ops where their kernel is this package's torch code ----------------------------------------
def direct(op, kernel, in_graphs=lambda *args: True):
    """`op` on devices with kernels of their own (neuron) and where nothing runs (meta); on CPU and CUDA, whose
    kernel of `op` is `kernel`, that code called directly: the same math without the op's dispatch (~80 us a call
    on CPU) and, in a graph being compiled, traced into it, so inductor fuses it with its neighbours instead of
    calling an opaque op (compiled decode b1 of `small` here: 24.5 -> 20.5 ms a step). `in_graphs(*args)` says
    whether to trace it (default: always). Used by the decode step, where a batch of one cannot amortise either
    cost, and by prompt chunks eagerly (`prefill_*`: in their graphs the ops stay, matmul-bound and faster to
    compile)."""

    @functools.wraps(kernel)
    def call(*args):
        if args[0].device.type in ("cpu", "cuda") and (not torch.compiler.is_compiling() or in_graphs(*args)):
            return kernel(*args)
        return op(*args)

    return call


decode_step_gated_delta_rule = direct(step_gated_delta_rule, _step)
decode_causal_conv1d_update = direct(causal_conv1d_update, _conv_update)
decode_write_kv = direct(write_kv, pa.write_kv)
# Paged attention is never traced into a graph: a compiled graph calls the op, whose kernel is the same eager code
# at every block-table width. Traced, inductor's code for one tile sums differently from the op's, so a sequence
# decoded beside a long one (a wider bucket: the op) and replayed alone after a crash (one tile: traced) parted
# ways (batch invariance: engine/runner.py decode_row_multiple). Tracing one-tile tables saved 7-14% of a compiled
# decode step of `small` at batch 1 (bf16, this repo's 2-core EPYC); traced at every width, its loop over tiles
# unrolls per width bucket (a decode service's warm-up went from 50 s to 430 s).
decode_paged_attention = direct(paged_attention_decode, pa.paged_attention_decode, lambda *args: False)
# A prompt chunk's ops: eagerly on CPU and CUDA their own code, called directly; in a graph being compiled, the ops
# (opaque, as they always were there: matmul-bound, and faster to compile). An op's first eager call makes torch
# import torch._dynamo (~1-2 s of CPU: at the start of every prefill and decode process that does not compile).
prefill_chunk_gated_delta_rule = direct(chunk_gated_delta_rule, _chunk_code, lambda *args: False)
prefill_causal_conv1d = direct(causal_conv1d, _conv_code, lambda *args: False)
prefill_write_kv = direct(write_kv, pa.write_kv, lambda *args: False)
prefill_paged_attention = direct(paged_attention_prefill, pa.paged_attention_prefill, lambda *args: False)


# ---- per-device kernels -----------------------------------------------------------------------------------------
@functools.cache
def register_device_kernels(device_type: str) -> str:
    """Add the kernels of `device_type` to the ops (once); returns which family now serves the DeltaNet ops."""
    if device_type == "neuron":
        from qwenpd.kernels.nki import torch_ops

        return torch_ops.register(chunk_gated_delta_rule, step_gated_delta_rule)
    return "torch"
