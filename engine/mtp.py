"""The checkpoint's multi-token-prediction (MTP) head: the draft model of speculative decoding.

Public Qwen3.5/3.6 checkpoints ship it under `mtp.*` (`mtp_num_hidden_layers` decoder layers, 1 in every published
one). As vLLM's `qwen3_5_mtp.py` (Qwen3_5MultiTokenPredictor) and SGLang's Qwen3.5 NEXTN model run it, position t
of the head reads two things: the main model's hidden state at t *after* its final norm (what the main model's
lm_head reads to predict token t+1) and the embedding of token t+1; it predicts token t+2:

    x = fc([pre_fc_norm_embedding(embed(token[t+1])) | pre_fc_norm_hidden(hidden[t])])   # [2H] -> [H]
    x = x + attention(input_layernorm(x)) at position t, over the head's own KV of positions <= t
    x = x + mlp(post_attention_layernorm(x))
    out = norm(x);  logits = lm_head(out)       # the main model's embedding and lm_head, shared

A draft chain feeds `out` back as the next position's hidden (vLLM does the same): drafts after the first read the
head's own output instead of the main model's. The head's attention is an ordinary gated GQA layer (the main
model's AttentionMixer weights and projections), with its KV in a small contiguous cache per sequence (MTPCache):
drafts only decide how many tokens a verify pass accepts, never which tokens come out, so the head needs no paged
layout and no batch invariance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenpd.engine.config import FULL, ModelConfig
from qwenpd.engine.layers import Rotary, rms_norm
from qwenpd.engine.linear import Linear
from qwenpd.engine.model import Block, HybridModel
from qwenpd.engine.weights import DRAFT_HEAD, MTP


class MTPCache:
    """One sequence's KV of the head's layers: [capacity, Hkv, D] per layer, grown by doubling. Entries written by
    drafts past the verified tokens are overwritten when the verified tokens are fed (speculative.Drafter.draft)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        shape = (capacity, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.mtp_num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.mtp_num_hidden_layers)]

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        need = int(positions.max()) + 1
        if need > self.k[layer].shape[0]:
            grow = max(need, 2 * self.k[layer].shape[0]) - self.k[layer].shape[0]
            self.k[layer] = F.pad(self.k[layer], (0, 0, 0, 0, 0, grow))
            self.v[layer] = F.pad(self.v[layer], (0, 0, 0, 0, 0, grow))
        self.k[layer][positions] = k.to(self.k[layer].dtype)
        self.v[layer][positions] = v.to(self.v[layer].dtype)


class MTPHead:
    """The head over a loaded HybridModel (its embedding and lm_head); `weights` are load_mtp_weights' (`mtp.*`)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], model: HybridModel):
        self.config = config
        self.model = model
        self.dtype = model.dtype
        self.eps = config.rms_norm_eps
        self.norm_embedding = 1.0 + weights[MTP + "pre_fc_norm_embedding.weight"].float()
        self.norm_hidden = 1.0 + weights[MTP + "pre_fc_norm_hidden.weight"].float()
        self.final_norm = 1.0 + weights[MTP + "norm.weight"].float()
        self.fc = Linear(weights[MTP + "fc.weight"])
        # logits over the tokenizer's tokens only, where the embedding is padded far past it (load_mtp_weights)
        self.draft_head = Linear(weights[DRAFT_HEAD]) if DRAFT_HEAD in weights else None
        layer_config = config.replace(num_hidden_layers=1, layer_types=(FULL,))
        rotary = Rotary(config, model.device)
        self.layers = []
        for i in range(config.mtp_num_hidden_layers):
            prefix = f"{MTP}layers.{i}."
            renamed = {"layers.0." + k[len(prefix):]: t for k, t in weights.items() if k.startswith(prefix)}
            self.layers.append(Block(layer_config, renamed, 0, rotary))

    def new_cache(self) -> MTPCache:
        return MTPCache(self.config, self.dtype, self.model.device)

    def forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, cache: MTPCache,
                step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [T] of one sequence (consecutive, ascending): hidden [T, H] (a main model's or the head's own
        normed output), next_tokens [T] (the token after each position). Writes their KV, attends over every
        position <= each. Returns (the head's normed output [T, H] in the model dtype, fp32 logits [T, V]; [T, rows]
        with a draft head of the tokenizer's rows).
        `step` picks the layer (draft k uses layer k mod mtp_num_hidden_layers, as vLLM does)."""
        layer = step % len(self.layers)
        blk = self.layers[layer]
        e = rms_norm(self.model.embed_tokens(next_tokens), self.norm_embedding, self.eps, self.dtype)
        h = rms_norm(hidden.float(), self.norm_hidden, self.eps, self.dtype)
        x = self.fc(torch.cat([e, h], dim=-1)).float()  # the residual stream, fp32 as in the main model
        mixer = blk.mixer
        q, gate, k, v = mixer._qkv(blk.norm(x), positions)
        cache.write(layer, positions, k, v)
        end = int(positions[-1]) + 1
        keys, values = cache.k[layer][:end], cache.v[layer][:end]
        visible = torch.arange(end, device=x.device)[None, :] <= positions[:, None]  # [T, end]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None].to(keys.dtype), keys.transpose(0, 1)[None],
                                           values.transpose(0, 1)[None], attn_mask=visible, scale=mixer.scale,
                                           enable_gqa=True)[0].transpose(0, 1)
        out = mixer.o_proj(o.reshape(x.shape[0], -1).float() * torch.sigmoid(gate.float()))
        x = blk.finish(x, out)
        normed = rms_norm(x, self.final_norm, self.eps, self.dtype)
        if self.draft_head is not None:
            return normed, self.draft_head(normed).float()
        logits = self.model.lm_head(normed).float()
        if self.model.tp is not None:
            logits = self.model.tp.gather_vocab(logits)
        return normed, logits


def load_head(engine, model_dir) -> MTPHead:
    """The MTP head of `engine`'s checkpoint (WeightError naming the missing mtp.* tensors without one). Where the
    embedding is padded far past the tokenizer (the test and bench presets: 571 tokens, 32,000 rows), drafts get
    logits of the tokenizer's rows only; a real checkpoint's few padding rows keep the shared lm_head."""
    from qwenpd.engine.weights import load_mtp_weights

    words = engine.grammars.words if engine.grammars is not None else None
    rows = words if words is not None and words < 0.9 * engine.config.vocab_size else None
    return MTPHead(engine.config, load_mtp_weights(model_dir, engine.config, engine.dtype, draft_rows=rows),
                   engine.model)
