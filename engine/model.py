"""The Qwen3.5/3.6 hybrid text model: embedding -> [DeltaNet | gated GQA] + MLP blocks -> norm -> lm_head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwenpd.engine.config import LINEAR, ModelConfig
from qwenpd.engine.layers import MLP, AttentionMixer, DeltaNetMixer, Linear, Rotary, rms_norm
from qwenpd.engine.state import HybridState


@dataclass(frozen=True, slots=True)
class DeltaNetKernels:
    """What the DeltaNet layers call (same shapes and contract as the qwenpd:: ops in kernels/ops.py).

    "torch": the custom ops, whose kernel is picked per device (torch reference, FLA on CUDA, NKI on neuron).
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
            return cls("torch", ops.chunk_gated_delta_rule, ops.step_gated_delta_rule, ops.causal_conv1d,
                       ops.causal_conv1d_update)
        if name == "nki":  # NKI kernels: the real nki on trn2, the CPU emulator elsewhere (imported lazily)
            from qwenpd.kernels.nki import torch_ops

            return cls("nki", torch_ops.nki_chunk, torch_ops.nki_step, ops.causal_conv1d, ops.causal_conv1d_update)
        raise ValueError(f"unknown deltanet kernels {name!r}; choose 'torch' or 'nki'")


class Block:
    """One decoder layer: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: ModelConfig, w: dict[str, torch.Tensor], index: int, rotary: Rotary):
        p = f"layers.{index}."
        self.index = index
        self.is_linear = c.layer_types[index] == LINEAR
        self.eps = c.rms_norm_eps
        self.in_norm = 1.0 + w[p + "input_layernorm.weight"].float()
        self.post_norm = 1.0 + w[p + "post_attention_layernorm.weight"].float()
        self.mixer = DeltaNetMixer(c, w, p) if self.is_linear else AttentionMixer(c, w, p, rotary)
        self.mlp = MLP(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], 0),
                       w[p + "mlp.down_proj.weight"])

    def finish(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        x = x + mixed
        return x + self.mlp(rms_norm(x, self.post_norm, self.eps))


class HybridModel:
    """Holds the (fused) weights; runs prefill chunks on one sequence and decode steps on a batch."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], kernels: DeltaNetKernels):
        self.config = config
        self.kernels = kernels
        self.device = weights["embed_tokens.weight"].device
        rotary = Rotary(config, self.device)
        self.embed = weights["embed_tokens.weight"]
        self.lm_head = Linear(weights["embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"])
        self.final_norm = 1.0 + weights["norm.weight"].float()
        self.blocks = [Block(config, weights, i, rotary) for i in range(config.num_hidden_layers)]
        # position of each layer inside its kind's state lists
        self.slot = {}
        for kind_layers in (config.linear_layers, config.attention_layers):
            for j, layer in enumerate(kind_layers):
                self.slot[layer] = j
        self.dtype = self.embed.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (pre-norm) -> fp32 logits [N, V] (lm_head in model dtype, like transformers)."""
        h = rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()

    @torch.inference_mode()
    def prefill_chunk(self, token_ids: list[int], state: HybridState, all_logits: bool = False
                      ) -> torch.Tensor:
        """Consume token_ids (T host ints) into `state` (in place). Returns logits of the last token [V] (or all
        [T, V])."""
        t = len(token_ids)
        start = state.num_tokens
        state.reserve(start + t)
        x = self.embed[torch.tensor(token_ids, dtype=torch.long, device=self.device)]
        for blk in self.blocks:
            h = rms_norm(x, blk.in_norm, blk.eps)
            j = self.slot[blk.index]
            if blk.is_linear:
                mixed = blk.mixer.prefill(h, state.conv[j], state.recurrent[j], self.kernels)
            else:
                mixed = blk.mixer.prefill(h, state.keys[j], state.values[j], start)
            x = blk.finish(x, mixed)
        state.num_tokens = start + t
        state.token_ids.extend(token_ids)
        return self.logits(x) if all_logits else self.logits(x[-1:])[0]

    @torch.inference_mode()
    def decode_step(self, token_ids: list[int], states: list[HybridState], conv: list[torch.Tensor],
                    recurrent: list[torch.Tensor]) -> torch.Tensor:
        """One token for each of B sequences: token_ids (B host ints); conv[j] [B, D, W-1] and recurrent[j] [B, Hv, dk, dv]
        are the batch's stacked DeltaNet states (updated in place). KV lives in each state. Returns logits [B, V]."""
        positions = [s.num_tokens for s in states]
        for s in states:
            s.reserve(s.num_tokens + 1)
        x = self.embed[torch.tensor(token_ids, dtype=torch.long, device=self.device)]
        for blk in self.blocks:
            h = rms_norm(x, blk.in_norm, blk.eps)
            j = self.slot[blk.index]
            if blk.is_linear:
                mixed = blk.mixer.decode(h, conv[j], recurrent[j], self.kernels)
            else:
                kv = [(s.keys[j], s.values[j]) for s in states]
                mixed = blk.mixer.decode(h, kv, positions)
            x = blk.finish(x, mixed)
        for s, tok in zip(states, token_ids):
            s.num_tokens += 1
            s.token_ids.append(tok)
        return self.logits(x)
