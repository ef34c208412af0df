"""The layers of a Qwen3.5/3.6 hybrid decoder, as transformers' Qwen3_5ForCausalLM computes them.

Each token mixer has a prefill path (one sequence, T tokens, resumes from carried state) and a decode path
(B sequences, one token each). Projections that read the same input are fused into one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.linear import Linear, cat, pad_rows
from qwenpd.kernels import ops
from qwenpd.kernels.gated_delta_rule.step import StepInputs, step_inputs


ROW_BLOCK = 128  # rows per block of a row-wise fp32 chain over a long prefill chunk (by_row_blocks)


def by_row_blocks(x: torch.Tensor) -> bool:
    """Whether to run a row-wise elementwise chain over x [T, ...] in blocks of ROW_BLOCK rows: eager CPU code on
    more rows than one block. Each op of such a chain reads and writes the whole tensor in fp32; over a long chunk
    that is MBs a pass, out of cache. A block's temporaries stay in cache (MLP activation of `small` over 2048
    rows: 7.5 -> 4.6 ms here). Every row's result is the same bits either way (row-wise ops). Compiled graphs
    fuse the chain instead."""
    return x.shape[0] > ROW_BLOCK and x.device.type == "cpu" and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """Zero-centred RMSNorm over the last dim: normalise in fp32, scale by (1 + w) in fp32, cast to out_dtype
    (default x.dtype). `weight_plus_one` is fp32."""
    if not by_row_blocks(x):
        return _rms_norm(x, weight_plus_one, eps, out_dtype or x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype)
    for r in range(0, x.shape[0], ROW_BLOCK):
        out[r:r + ROW_BLOCK] = _rms_norm(x[r:r + ROW_BLOCK], weight_plus_one, eps, torch.float32)
    return out


def _rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight_plus_one).to(out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to out_dtype (the down projection's input)."""
    if not by_row_blocks(gate):
        return (F.silu(gate.float()) * up.float()).to(out_dtype)
    out = torch.empty(gate.shape, dtype=out_dtype)
    for r in range(0, gate.shape[0], ROW_BLOCK):
        act = F.silu(gate[r:r + ROW_BLOCK].to(torch.float32, copy=True), inplace=True)  # never the caller's
        out[r:r + ROW_BLOCK] = act.mul_(up[r:r + ROW_BLOCK])  # bf16 `up` multiplies as its exact fp32 value
    return out


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """DeltaNet output norm: norm(x) * w (standard weight, in model dtype) * silu(gate) in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * xf.to(x.dtype)) * F.silu(gate.float())).to(x.dtype)


VECTOR_SPAN = 64  # elements: the most one step of torch's CPU elementwise loops takes (2 vectors of 32 bf16)


MROPE_SECTION = (11, 11, 10)  # transformers' default where a config names none


def mrope_axes(config: ModelConfig) -> torch.Tensor:
    """Which of a token's three positions (0 temporal, 1 height, 2 width) each rotary frequency turns with:
    interleaved sections, as transformers' Qwen3.5 recomposes them (frequency i -> height if i % 3 == 1 and
    i < 3*section[1], width if i % 3 == 2 and i < 3*section[2], temporal otherwise). [rotary_dim / 2] long."""
    section = config.mrope_section or MROPE_SECTION
    axes = []
    for i in range(config.rotary_dim // 2):
        if i % 3 == 1 and i < 3 * section[1]:
            axes.append(1)
        elif len(section) > 2 and i % 3 == 2 and i < 3 * section[2]:
            axes.append(2)
        else:
            axes.append(0)
    return torch.tensor(axes, dtype=torch.long)


class Rotary:
    """Partial rotary embedding on the first `rotary_dim` dims of each head. Positions are one per token (text:
    mRoPE with three equal positions is plain RoPE) or three (mRoPE: temporal, height, width; engine/mrope.py)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        dim = config.rotary_dim
        self.dim = dim
        steps = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (config.rope_theta ** (steps / dim))
        # [inv_freq, inv_freq] padded to whole vector spans: cos/sin of every position take torch's vector path
        # whatever the number of rows (batch invariance: runner.decode_row_multiple)
        self.inv_freq2 = F.pad(torch.cat([inv_freq, inv_freq]), (0, -dim % VECTOR_SPAN))
        axes = mrope_axes(config)
        self.axes2 = F.pad(torch.cat([axes, axes]), (0, -dim % VECTOR_SPAN)).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] (or [N, 3]: mRoPE) -> cos, sin [N, rotary_dim] in `dtype` (computed in fp32 like
        transformers; a token with three equal positions gets the bits of the one-position form)."""
        if positions.dim() == 2:
            emb = positions.float().index_select(1, self.axes2) * self.inv_freq2[None, :]
        else:
            emb = positions.float()[:, None] * self.inv_freq2[None, :]
        return emb.cos()[:, :self.dim].to(dtype), emb.sin()[:, :self.dim].to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D]; cos/sin [N, rotary_dim]."""
        d = self.dim
        rot, rest = x[..., :d], x[..., d:]
        half = d // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos[:, None, :] + rotated * sin[:, None, :]
        return torch.cat([out, rest], dim=-1)


class MLP:
    """SwiGLU with gate and up projections fused into one matmul."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up = Linear(gate_up)  # [2I, H]
        self.down = Linear(down)  # [H, I]

    def __call__(self, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        """`step`: x's rows are decode-step tokens (Linear)."""
        gate, up = self.gate_up(x, step).chunk(2, dim=-1)
        return self.down(swiglu(gate, up, self.down.dtype), step)  # fp32 product, rounded once at down's input


class DeltaNetMixer:
    """Gated DeltaNet token mixer: fused in-projection -> causal conv -> gated delta rule -> gated norm -> out."""

    def __init__(self, c: ModelConfig, w: dict[str, torch.Tensor], prefix: str):
        p = prefix + "linear_attn."
        self.c = c
        # one matmul for q|k|v (conv input), z (output gate), b (beta), a (decay)
        # b and a each padded with zero rows to whole vector spans: their sigmoid and softplus take torch's vector
        # path for every head whatever the number of rows (batch invariance: runner.decode_row_multiple)
        hv = self.num_heads = c.linear_num_value_heads
        span = hv + -hv % VECTOR_SPAN
        b, a = (pad_rows(w[p + name], span - hv) for name in ("in_proj_b.weight", "in_proj_a.weight"))
        self.in_proj = Linear(cat([w[p + "in_proj_qkv.weight"], w[p + "in_proj_z.weight"], b, a]))
        # fp32 taps on fp32 inputs: the conv, the delta rule and the output norm run on unrounded activations
        self.conv_weight = w[p + "conv1d.weight"][:, 0, :].float().contiguous()  # [D, W]
        self.neg_A = F.pad(-w[p + "A_log"].float().exp(), (0, span - hv))  # [span]
        self.dt_bias = F.pad(w[p + "dt_bias"], (0, span - hv))
        self.norm_weight = w[p + "norm.weight"]
        self.out_proj = Linear(w[p + "out_proj.weight"])
        self.splits = (c.conv_dim, c.linear_value_dim, span, span)

    def _project(self, x: torch.Tensor, step: bool = False):
        """x [N, H] -> the conv input [N, conv_dim] (fp32), the output gate z, and the write strength beta and decay
        g [N, span] (fp32, padded to whole vector spans: `heads` takes the real heads). `step`: x's rows are
        decode-step tokens (Linear), as in _output."""
        mixed, z, b, a = self.in_proj(x, step).split(self.splits, dim=-1)
        return mixed.float(), z, b.float().sigmoid(), self.neg_A * F.softplus(a.float() + self.dt_bias)

    def heads(self, per_span: torch.Tensor) -> torch.Tensor:
        """beta or g [..., span] -> [..., Hv]: a view (its rows keep the span's stride, as every step reads them)."""
        return per_span[..., :self.num_heads]

    def _split_heads(self, mixed: torch.Tensor):
        c = self.c
        q, k, v = mixed.split((c.linear_key_dim, c.linear_key_dim, c.linear_value_dim), dim=-1)
        lead = mixed.shape[:-1]
        return (q.reshape(*lead, c.linear_num_key_heads, c.linear_key_head_dim),
                k.reshape(*lead, c.linear_num_key_heads, c.linear_key_head_dim),
                v.reshape(*lead, c.linear_num_value_heads, c.linear_value_head_dim))

    def _output(self, o: torch.Tensor, z: torch.Tensor, step: bool = False) -> torch.Tensor:
        c = self.c
        z = z.reshape(*z.shape[:-1], c.linear_num_value_heads, c.linear_value_head_dim)
        o = gated_rms_norm(o, z, self.norm_weight, c.rms_norm_eps)
        return self.out_proj(o.flatten(-2), step)

    def prefill(self, x: torch.Tensor, conv_state: torch.Tensor, rec_state: torch.Tensor, kernels,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H]; conv_state [D, W-1] and rec_state [Hv, dk, dv] (fp32) are updated in place. mask [T] bool
        marks the real tokens (a prefix; padding leaves both states alone)."""
        mixed, z, beta, g = self._project(x)
        beta, g = self.heads(beta), self.heads(g)
        mask = None if mask is None else mask[None]
        mixed, new_conv = kernels.conv(mixed[None], self.conv_weight, conv_state[None], mask)
        conv_state.copy_(new_conv[0])
        q, k, v = self._split_heads(mixed[0])
        o, new_rec = kernels.chunk(q[None], k[None], v[None], g[None], beta[None], rec_state[None], mask)
        rec_state.copy_(new_rec[0])
        return self._output(o[0], z)

    def recur(self, mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, conv_state: torch.Tensor,
              rec_state: torch.Tensor, kernels) -> torch.Tensor:
        """A decode step's recurrence, the only part of it that is sequential in tokens: B rows of _project's
        mixed, beta, g (span-padded) through the conv and the delta rule; conv_state [B, D, W-1] and rec_state
        [B, Hv, dk, dv] are updated in place. Returns the core output [B, Hv, dv]."""
        mixed = kernels.conv_update(mixed, self.conv_weight, conv_state)
        return kernels.step(*self._split_heads(mixed), self.heads(g), self.heads(beta), rec_state)

    def prepare_steps(self, mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, conv_state: torch.Tensor,
                      kernels) -> StepInputs:
        """`recur`'s work before the delta rule reads its state, for n tokens of each of B sequences (a speculative
        verify pass's rows, sequence-major [B*n, ...]; conv_state [B, D, W-1], left as it was): the conv a token
        at a time as n decode steps run it, on a copy of the state, then every row's step inputs. With the step
        kernel's state updates after it (gated_delta_rule.step_states), the bits of n `recur` calls."""
        state = conv_state.clone()
        rows = mixed.view(state.shape[0], -1, mixed.shape[-1])
        out = torch.stack([kernels.conv_update(rows[:, i], self.conv_weight, state) for i in range(rows.shape[1])],
                          dim=1)
        return step_inputs(*self._split_heads(out.view(mixed.shape)), self.heads(g), self.heads(beta))


class AttentionMixer:
    """Gated GQA: q_proj rows are per-head [q | gate]; q/k zero-centred norms; partial RoPE; out * sigmoid(gate)."""

    def __init__(self, c: ModelConfig, w: dict[str, torch.Tensor], prefix: str, rotary: Rotary):
        p = prefix + "self_attn."
        self.c = c
        self.rotary = rotary
        self.qkv = Linear(cat([w[p + "q_proj.weight"], w[p + "k_proj.weight"], w[p + "v_proj.weight"]]))
        self.o_proj = Linear(w[p + "o_proj.weight"])
        self.q_norm = 1.0 + w[p + "q_norm.weight"].float()
        self.k_norm = 1.0 + w[p + "k_norm.weight"].float()
        self.splits = (2 * c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                       c.num_key_value_heads * c.head_dim)
        self.scale = c.head_dim ** -0.5

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, step: bool = False):
        """x [N, H] -> q [N, nh, D], gate [N, nh*D], k, v [N, nkv, D] with norms and rotary applied (q, k in fp32:
        rounded only where they enter a matmul or the KV cache). `step`: x's rows are decode-step tokens (Linear)."""
        c = self.c
        n = x.shape[0]
        qg, k, v = self.qkv(x, step).split(self.splits, dim=-1)
        qg = qg.view(n, c.num_attention_heads, 2 * c.head_dim)
        q, gate = qg[..., : c.head_dim], qg[..., c.head_dim:].reshape(n, -1)
        q = rms_norm(q, self.q_norm, c.rms_norm_eps, torch.float32)
        k = rms_norm(k.view(n, c.num_key_value_heads, c.head_dim), self.k_norm, c.rms_norm_eps, torch.float32)
        v = v.view(n, c.num_key_value_heads, c.head_dim)
        cos, sin = self.rotary.cos_sin(positions, torch.float32)
        return self.rotary.apply(q, cos, sin), gate, self.rotary.apply(k, cos, sin), v

    def prefill(self, x: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                table: torch.Tensor, start: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] at positions start..start+T-1 (start [1]); this chunk's K/V go to pool slots [T] first, then
        every query attends causally over the sequence's pages (table [W]). `rope` [T, 3]: the tokens' mRoPE
        positions where they are not their indices (a prompt with images; engine/mrope.py)."""
        t = x.shape[0]
        positions = start + torch.arange(t, device=x.device)
        q, gate, k, v = self._qkv(x, positions if rope is None else rope)
        ops.prefill_write_kv(k_pool, v_pool, slots, k, v)
        o = ops.prefill_paged_attention(q.to(k_pool.dtype), k_pool, v_pool, table, start, self.scale)
        return self.o_proj(o.reshape(t, -1).float() * torch.sigmoid(gate.float()))

    def decode(self, x: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
               tables: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, H]; sequence b's new K/V go to slots[b] (its token positions[b]), then one paged attention
        call for the whole batch (tables [B, W]; fp32 scores and sums). `rope` [B]: rotary positions where they
        differ from the token positions (positions + a prompt's mRoPE delta)."""
        q, gate, k, v = self._qkv(x, positions if rope is None else rope, step=True)
        ops.decode_write_kv(k_pool, v_pool, slots, k, v)
        o = ops.decode_paged_attention(q, k_pool, v_pool, tables, positions + 1, self.scale)  # fp32 q and out
        return self.o_proj(o.reshape(x.shape[0], -1) * torch.sigmoid(gate.float()), step=True)
