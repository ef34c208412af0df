"""The Qwen3.5/3.6 hybrid text model: embedding -> [DeltaNet | gated GQA] + MLP blocks -> norm -> lm_head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwenpd.engine.config import LINEAR, ModelConfig
from qwenpd.engine.layers import MLP, AttentionMixer, DeltaNetMixer, Rotary, rms_norm
from qwenpd.engine.linear import Linear, cat
from qwenpd.kernels.gated_delta_rule.step import StepInputs


@dataclass(frozen=True, slots=True)
class DeltaNetKernels:
    """What the DeltaNet layers call (same shapes and contract as the qwenpd:: ops in kernels/ops.py).

    "torch": the custom ops, whose kernel is picked per device (the torch reference; the NKI kernels on neuron);
             on CPU and CUDA eager code and decode steps call the torch reference directly (ops.prefill_*,
             ops.decode_*).
    "fla": flash-linear-attention's chunked Triton kernel for prefill (CUDA; tf32 inside); decode steps on the
           torch op (FLA's recurrent step failed our check, see kernels/ops.py).
    "nki": the NKI kernels called directly, eagerly (the CPU emulator without the Neuron SDK; tests and demos).
    """

    name: str
    chunk: Callable  # (q, k, v, g, beta, initial_state, mask) -> (o, final_state)
    step: Callable  # (q, k, v, g, beta, state) -> o, state updated in place
    conv: Callable  # (x, weight, state, mask) -> (y, new_state)
    conv_update: Callable  # (x, weight, state) -> y, state updated in place

    @classmethod
    def named(cls, name: str) -> "DeltaNetKernels":
        from qwenpd.kernels import ops

        if name == "torch":
            return cls("torch", ops.prefill_chunk_gated_delta_rule, ops.decode_step_gated_delta_rule,
                       ops.prefill_causal_conv1d, ops.decode_causal_conv1d_update)
        if name == "fla":
            return cls("fla", ops.fla_chunk_gated_delta_rule, ops.decode_step_gated_delta_rule,
                       ops.prefill_causal_conv1d, ops.decode_causal_conv1d_update)
        if name == "nki":  # NKI kernels: the real nki on trn2, the CPU emulator elsewhere (imported lazily)
            from qwenpd.kernels.nki import torch_ops

            return cls("nki", torch_ops.nki_chunk, torch_ops.nki_step, ops.prefill_causal_conv1d,
                       ops.decode_causal_conv1d_update)
        raise ValueError(f"unknown deltanet kernels {name!r}; choose 'torch', 'fla' or 'nki'")


class Block:
    """One decoder layer: x + mixer(norm(x)), then x + mlp(norm(x)). The residual stream x is fp32; norms read it
    in fp32 and round once, to the model dtype, for the matmuls that follow."""

    def __init__(self, c: ModelConfig, w: dict[str, torch.Tensor], index: int, rotary: Rotary,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        p = f"layers.{index}."
        self.reduce = reduce
        self.index = index
        self.is_linear = c.layer_types[index] == LINEAR
        self.eps = c.rms_norm_eps
        self.dtype = w[p + "input_layernorm.weight"].dtype
        self.in_norm = 1.0 + w[p + "input_layernorm.weight"].float()
        self.post_norm = 1.0 + w[p + "post_attention_layernorm.weight"].float()
        self.mixer = DeltaNetMixer(c, w, p) if self.is_linear else AttentionMixer(c, w, p, rotary)
        self.mlp = MLP(cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),
                       w[p + "mlp.down_proj.weight"])

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer's input: fp32 residual [N, H] -> normalised, in the model dtype."""
        return rms_norm(x, self.in_norm, self.eps, self.dtype)

    def finish(self, x: torch.Tensor, mixed: torch.Tensor, step: bool = False) -> torch.Tensor:
        """x + mixer output, then + MLP output. Under tensor parallelism both are partial sums of the row-parallel
        projections (o_proj / out_proj, down_proj): summed over the ranks in fp32 before they join x. `step`: x's
        rows are decode-step tokens (engine/linear.py Linear)."""
        if self.reduce is None:
            x = x + mixed  # fp32 + model dtype -> fp32
            return x + self.mlp(rms_norm(x, self.post_norm, self.eps, self.dtype), step)
        x = x + self.reduce(mixed.float())
        return x + self.reduce(self.mlp(rms_norm(x, self.post_norm, self.eps, self.dtype), step).float())


class HybridModel:
    """Holds the (fused) weights; runs prefill chunks on one sequence and decode steps on a batch.

    Under tensor parallelism (`tp`, a TPGroup) `config` is the rank's local config and `weights` its shard
    (engine/sharding.py): the same code computes its heads and channels, `tp.all_reduce` sums the row-parallel
    outputs and `tp.gather_vocab` joins the vocabulary slices of the logits."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], kernels: DeltaNetKernels, tp=None):
        self.config = config
        self.kernels = kernels
        self.tp = tp
        self.device = weights["embed_tokens.weight"].device
        rotary = Rotary(config, self.device)
        self.embed = weights["embed_tokens.weight"]  # sharded: this rank's vocabulary rows
        self.vocab_start = 0 if tp is None else tp.rank * self.embed.shape[0]
        self.lm_head = Linear(weights["lm_head.weight"] if "lm_head.weight" in weights else self.embed)
        self.final_norm = 1.0 + weights["norm.weight"].float()
        reduce = None if tp is None else tp.all_reduce
        self.blocks = [Block(config, weights, i, rotary, reduce) for i in range(config.num_hidden_layers)]
        # position of each layer inside its kind's state lists
        self.slot = {}
        for kind_layers in (config.linear_layers, config.attention_layers):
            for j, layer in enumerate(kind_layers):
                self.slot[layer] = j
        self.dtype = self.embed.dtype

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> the fp32 residual stream [N, H]. Sharded by vocabulary: each rank looks up the ids in its
        rows (zeros for the others) and the all-reduce joins them (exact: one nonzero term per row)."""
        if self.tp is None:
            return self.embed[ids].float()
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)].float() * mine[:, None]
        return self.tp.all_reduce(x)

    def final_normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (the fp32 residual stream) after the final norm, in the model dtype: what the lm_head reads,
        and what an MTP head reads."""
        return rms_norm(hidden, self.final_norm, self.config.rms_norm_eps, self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (pre-norm) -> fp32 logits [N, V] (lm_head in model dtype, like transformers). An int8
        lm_head multiplies every call's rows (few but for scored prompts) by the int8 step kernel (Linear)."""
        return self.normed_logits(hidden)[0]

    def normed_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits` of hidden [N, H], and the final-normed rows the lm_head read ([N, H], model dtype: what an MTP
        head reads), from one call: a decode step's head region (compiled, the norm is computed once there)."""
        normed = self.final_normed(hidden)
        logits = self.lm_head(normed, step=True).float()
        return (logits if self.tp is None else self.tp.gather_vocab(logits)), normed

    # ---- tensor-only graphs: static shapes, no host reads (what --compile compiles) --------------------------
    def prefill_graph(self, ids: torch.Tensor, conv: list[torch.Tensor], recurrent: list[torch.Tensor],
                      k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], slots: torch.Tensor,
                      table: torch.Tensor, start: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor,
                      layers: "HybridModel | None" = None, normed: list | None = None,
                      embeds: tuple[torch.Tensor, torch.Tensor] | None = None, rope: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """One chunk of one sequence. ids [T]; conv[j] [D, W-1], recurrent[j] [Hv, dk, dv] updated in place;
        pools [num_pages, Hkv, P, D]; slots [T] (padding -> null page); table [W]; start [1]; mask [T] bool of
        real tokens (a prefix; None = all real); last [N] rows whose logits to return. Returns logits [N, V].
        `layers` runs each layer and the head (default this model; a runner's compiled regions). `normed` (eager or
        regions): a list that gets the final-normed hidden states of every row [T, H] (what an MTP head reads).
        Images (eager only): `embeds` (rows [n], values [n, H]) replace those rows' token embeddings (the vision
        tower's output in place of <|image_pad|>); `rope` [T, 3] or [T] are the rotary positions where they are not
        start + row (engine/mrope.py)."""
        layers = layers or self
        x = self.embed_tokens(ids)  # the residual stream stays fp32
        if embeds is not None:  # as transformers: the embeddings in the model dtype, then the fp32 stream
            x = x.index_copy(0, embeds[0], embeds[1].to(self.dtype).float())
        for blk in self.blocks:
            j = self.slot[blk.index]
            if blk.is_linear:
                x = layers.linear_prefill(blk, x, conv[j], recurrent[j], mask)
            elif rope is not None:
                x = layers.attention_prefill(blk, x, k_pools[j], v_pools[j], slots, table, start, rope)
            else:
                x = layers.attention_prefill(blk, x, k_pools[j], v_pools[j], slots, table, start)
        if normed is not None:
            normed.append(self.final_normed(x))
        return layers.logits(x.index_select(0, last))

    def decode_graph(self, ids: torch.Tensor, conv: list[torch.Tensor], recurrent: list[torch.Tensor],
                     k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], slots: torch.Tensor,
                     tables: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                     layers: "HybridModel | None" = None, normed: list | None = None) -> torch.Tensor:
        """One token for each of B sequences. ids, slots, positions [B]; tables [B, W]; conv[j] [B, D, W-1] and
        recurrent[j] [B, Hv, dk, dv] updated in place; rope [B] the rotary positions (positions plus each
        sequence's mRoPE delta: engine/mrope.py). Returns logits [B, V]. `layers` as in prefill_graph; `normed`
        gets the final-normed hidden states [B, H] appended (what an MTP head reads; not in a whole-graph
        compile)."""
        layers = layers or self
        x = self.embed_tokens(ids)  # the residual stream stays fp32
        for blk in self.blocks:
            j = self.slot[blk.index]
            if blk.is_linear:  # three regions: a verify pass may run the middle one position by position
                # dense rows between them (a compiled region may return views; a verify pass gives dense rows)
                mixed, z, beta, g = layers.linear_decode_in(blk, x)
                core = layers.linear_decode_core(blk, mixed.contiguous(), beta.contiguous(), g.contiguous(), conv[j],
                                                 recurrent[j])
                x = layers.linear_decode_out(blk, x, core.contiguous(), z)
            else:
                x = layers.attention_decode(blk, x, k_pools[j], v_pools[j], slots, tables, positions, rope)
        logits, out = layers.normed_logits(x)
        if normed is not None:
            normed.append(out)
        return logits

    # ---- one layer of each kind: the graphs' steps, and the regions a regional compile compiles (once per kind
    # and shape, shared by every layer of that kind: a layer's weights are inputs, not constants) ---------------
    def linear_prefill(self, blk: Block, x: torch.Tensor, conv: torch.Tensor, recurrent: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        return blk.finish(x, blk.mixer.prefill(blk.norm(x), conv, recurrent, self.kernels, mask))

    def attention_prefill(self, blk: Block, x: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                          slots: torch.Tensor, table: torch.Tensor, start: torch.Tensor,
                          rope: torch.Tensor | None = None) -> torch.Tensor:
        return blk.finish(x, blk.mixer.prefill(blk.norm(x), k_pool, v_pool, slots, table, start, rope))

    def linear_decode_in(self, blk: Block, x: torch.Tensor):
        """A DeltaNet layer's decode step up to its recurrence, row by row: mixed, z, beta, g (DeltaNetMixer._project)
        of x [B, H]."""
        return blk.mixer._project(blk.norm(x), step=True)

    def linear_decode_core(self, blk: Block, mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                           conv: torch.Tensor, recurrent: torch.Tensor) -> torch.Tensor:
        """The recurrence (DeltaNetMixer.recur): conv [B, D, W-1] and recurrent [B, Hv, dk, dv] updated in place."""
        return blk.mixer.recur(mixed, beta, g, conv, recurrent, self.kernels)

    def linear_verify_inputs(self, blk: Block, mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                             conv: torch.Tensor) -> StepInputs:
        """A speculative verify pass's part of n linear_decode_core calls before the state (DeltaNetMixer.
        prepare_steps: rows sequence-major [B*n, ...], conv [B, D, W-1] read only); engine/speculative.py."""
        return blk.mixer.prepare_steps(mixed, beta, g, conv, self.kernels)

    def linear_decode_out(self, blk: Block, x: torch.Tensor, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The rest of the layer, row by row: gated norm, out_proj, residual, MLP."""
        return blk.finish(x, blk.mixer._output(core, z, step=True), step=True)

    def attention_decode(self, blk: Block, x: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         slots: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor
                         ) -> torch.Tensor:
        return blk.finish(x, blk.mixer.decode(blk.norm(x), k_pool, v_pool, slots, tables, positions, rope), step=True)
