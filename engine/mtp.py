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

import threading

import torch
import torch.nn.functional as F

from qwenpd.engine.config import FULL, ModelConfig
from qwenpd.engine.layers import Rotary, rms_norm
from qwenpd.engine.linear import Linear, held_bytes
from qwenpd.engine.model import Block, HybridModel
from qwenpd.engine.weights import DRAFT_EMBED, DRAFT_HEAD, MTP

STEP_ROWS = 16  # head passes of at most this many rows (drafting ones) take Linear's decode-step path


class MTPCache:
    """One sequence's KV of the head's layers: [Hkv, capacity, D] per layer (a head's positions in a row, as
    attention reads them), grown by doubling. Entries written by drafts past the verified tokens are overwritten
    when the verified tokens are fed (speculative.Drafter.draft)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        capacity = max(1, capacity)
        shape = (config.num_key_value_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.mtp_num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.mtp_num_hidden_layers)]

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, Hkv, D] of positions [n]."""
        need, have = int(positions.max()) + 1, self.k[layer].shape[1]
        if need > have:
            grow = max(need, 2 * have) - have
            self.k[layer] = F.pad(self.k[layer], (0, 0, 0, grow))
            self.v[layer] = F.pad(self.v[layer], (0, 0, 0, grow))
        self.k[layer][:, positions] = k.transpose(0, 1).to(self.k[layer].dtype)
        self.v[layer][:, positions] = v.transpose(0, 1).to(self.v[layer].dtype)

    def load(self, kv: dict[str, torch.Tensor], positions: int) -> None:
        """Write a draft state's head KV (mtp.{l}.k/v, [Hkv, positions, D]: state_spec.draft_shapes) as positions
        0 .. positions-1; ValueError if it covers another number of positions."""
        if positions < 1:
            return
        where = torch.arange(positions, device=self.k[0].device)
        for layer in range(len(self.k)):
            k, v = kv[f"mtp.{layer}.k"], kv[f"mtp.{layer}.v"]
            if k.shape[1] != positions or v.shape[1] != positions:
                raise ValueError(f"the head KV covers {k.shape[1]} positions, not {positions}")
            self.write(layer, where, k.transpose(0, 1).to(where.device), v.transpose(0, 1).to(where.device))

    def copy_out(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """The head KV of positions [lo, hi) (mtp.{l}.k/v, [Hkv, hi-lo, D], host copies): `load`'s layout."""
        out = {}
        for layer in range(len(self.k)):
            out[f"mtp.{layer}.k"] = self.k[layer][:, lo:hi].contiguous().cpu()
            out[f"mtp.{layer}.v"] = self.v[layer][:, lo:hi].contiguous().cpu()
        return out

    def draft_state(self, lo: int, num_tokens: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The draft state after `num_tokens` tokens (state_spec.draft_shapes), less the head KV of positions
        before `lo` (which prefix-cache blocks hold): the KV of positions [lo, num_tokens-1) and `hidden`, the
        final-normed hidden state at num_tokens-1 (host copies)."""
        from qwenpd.engine.state_spec import DRAFT_HIDDEN

        out = self.copy_out(lo, num_tokens - 1)
        out[DRAFT_HIDDEN] = hidden.to(self.k[0].dtype).cpu()
        return out


ATTEND_ROWS = 64  # up to this many query rows `_attend` multiplies block by block; more (a prompt's chunk): SDPA
ATTEND_BLOCK = 4096  # keys per block: the fp32 copies of a block's keys and values are made at this one size


_scratch = threading.local()


def _blocks(hkv: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's fp32 buffers for a block of keys and of values, [hkv, ATTEND_BLOCK, d]: made once, again only
    when the shape changes (2 x 16 MB on Qwen3.6-27B's head shapes, per thread that drafts); not inference
    tensors, so that they can be written in and out of inference mode."""
    key = (hkv, ATTEND_BLOCK, d, str(device))
    held = getattr(_scratch, "blocks", None)
    if held is None or held[0] != key:
        with torch.inference_mode(False):
            held = _scratch.blocks = (key, *(torch.empty(key[:3], dtype=torch.float32, device=device)
                                             for _ in range(2)))
    return held[1], held[2]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
            ) -> torch.Tensor:
    """Causal GQA attention of q [n, Hq, D] (fp32) at positions [n] over keys, values [Hkv, end, D] of positions
    0 .. end-1: [n, Hq, D] in the cache dtype. Drafting passes and catch-ups (n <= ATTEND_ROWS): grouped matmuls in
    fp32 over blocks of ATTEND_BLOCK keys, an online softmax across blocks, so memory is bounded at any context.
    Why so (2-core EPYC, docs/performance.md ninth and tenth rounds):
    - torch's CPU SDPA took 0.6 ms for one bf16 query row over 640 keys and 14 ms over 16K, the matmuls 0.09 and
      2.6 ms;
    - a bf16 matmul goes to oneDNN, which builds a kernel for every new shape (~0.8 ms), and the key count grows
      every step: fp32 matmuls (MKL) instead;
    - fp32 copies that grow by a key every step are a new allocation above glibc's mmap threshold every time,
      each one page-faulted in afresh (8.6 ms to convert 4K keys of Qwen3.6-27B's head shapes against 0.8 at a
      fixed size; a fresh block-sized buffer costs its huge pages' zeroing instead): a block's copies go to this
      thread's two buffers of ATTEND_BLOCK keys (`_blocks`), made once.
    More rows (a prompt's chunk) go to SDPA, one fused call whose memory is bounded."""
    n, hq, d = q.shape
    hkv, end = keys.shape[0], keys.shape[1]
    if n > ATTEND_ROWS:
        visible = torch.arange(end, device=q.device)[None, :] <= positions[:, None]  # [n, end]
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None].to(keys.dtype), keys[None], values[None],
                                              attn_mask=visible, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    g = hq // hkv
    grouped = q.reshape(n, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n * g, d)  # query head h reads kv head h // g
    k32, v32 = _blocks(hkv, d, q.device)
    best = total = acc = None
    for lo in range(0, end, ATTEND_BLOCK):
        m = min(end - lo, ATTEND_BLOCK)
        k, v = k32[:, :m].copy_(keys[:, lo:lo + m]), v32[:, :m].copy_(values[:, lo:lo + m])
        scores = torch.bmm(grouped, k.transpose(1, 2)) * scale  # [Hkv, n*g, m]
        if n > 1:
            hidden = torch.arange(lo, lo + m, device=q.device)[None, :] > positions[:, None]  # [n, m]
            scores = scores.view(hkv, n, g, m).masked_fill(hidden[None, :, None, :], float("-inf")).view(hkv, n * g, m)
        if m == end:  # one block: a plain softmax
            acc, total = torch.bmm(torch.softmax(scores, dim=-1), v), 1.0
            break
        # key 0, in the first block, is visible to every row: `best` is finite from there on
        top = scores.amax(-1, keepdim=True) if best is None else torch.maximum(best, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores - top)
        if best is None:
            total, acc = weights.sum(-1, keepdim=True), torch.bmm(weights, v)
        else:
            rescale = torch.exp(best - top)
            total = total * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(weights, v)
        best = top
    out = acc / total  # [Hkv, n*g, D]
    return out.view(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, hq, d).to(values.dtype)


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
        own = {id(t): t for t in weights.values()}  # a tied head's rows are one tensor under two names
        self.weight_bytes = sum(held_bytes(t) for t in own.values())  # the head's own, as held
        self.fc = Linear(weights[MTP + "fc.weight"])
        # logits over the tokenizer's tokens only, where the embedding is padded far past it (load_mtp_weights)
        self.draft_head = Linear(weights[DRAFT_HEAD]) if DRAFT_HEAD in weights else None
        # under tensor parallelism the head runs on the leader alone, with its own whole embedding and lm_head rows
        # (the model's are vocabulary slices joined by collectives): load_mtp_weights(own_vocab=True)
        self.embed = weights.get(DRAFT_EMBED)
        if model.tp is not None and (self.embed is None or self.draft_head is None):
            raise ValueError("a tensor-parallel model's MTP head needs its own embedding and lm_head rows "
                             "(load_mtp_weights(own_vocab=True))")
        layer_config = config.replace(num_hidden_layers=1, layer_types=(FULL,))
        rotary = Rotary(config, model.device)
        self.layers = []
        for i in range(config.mtp_num_hidden_layers):
            prefix = f"{MTP}layers.{i}."
            renamed = {"layers.0." + k[len(prefix):]: t for k, t in weights.items() if k.startswith(prefix)}
            self.layers.append(Block(layer_config, renamed, 0, rotary))

    def new_cache(self, capacity: int = 256) -> MTPCache:
        return MTPCache(self.config, self.dtype, self.model.device, capacity)

    def forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor, cache: MTPCache,
                step: int = 0, logits: str = "all") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions [T] of one sequence (consecutive, ascending): hidden [T, H] (a main model's or the head's own
        normed output), next_tokens [T] (the token after each position). Writes their KV, attends over every
        position <= each. Returns (the head's normed output [T, H] in the model dtype, fp32 logits [T, V]; [T, rows]
        with a draft head of the tokenizer's rows).
        `step` picks the layer (draft k uses layer k mod mtp_num_hidden_layers, as vLLM does). `logits`: "all" rows,
        the "last" row only ([1, V]), or "none" (None: feeding the head's KV only)."""
        t = hidden.shape[0]
        rows = {"all": list(range(t)), "last": [t - 1], "none": []}[logits]
        normed, out = self.forward_many(hidden, next_tokens, positions, [cache], [t], step, rows)
        return normed, out if logits != "none" else None

    def forward_many(self, hidden: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                     caches: list[MTPCache], lengths: list[int], step: int = 0, logit_rows: list[int] = ()
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` for several sequences at once: rows [sum(lengths)] are theirs in order (each one's positions
        consecutive, ascending), caches[i] the i-th one's. Projections, the MLP and the logits run over all rows
        at once, attention per sequence over its own cache. Returns (normed output [R, H], fp32 logits of
        `logit_rows` [len, V], or None when there are none)."""
        layer = step % len(self.layers)
        blk = self.layers[layer]
        embedded = self.model.embed_tokens(next_tokens) if self.embed is None else self.embed[next_tokens].float()
        e = rms_norm(embedded, self.norm_embedding, self.eps, self.dtype)
        h = rms_norm(hidden.float(), self.norm_hidden, self.eps, self.dtype)
        few = hidden.shape[0] <= STEP_ROWS  # few rows: decode-step rows to Linear (an int8 head's kernel)
        x = self.fc(torch.cat([e, h], dim=-1), few).float()  # the residual stream, fp32 as in the main model
        mixer = blk.mixer
        q, gate, k, v = mixer._qkv(blk.norm(x), positions, few)
        outs, lo = [], 0
        for cache, n in zip(caches, lengths):
            pos = positions[lo:lo + n]
            cache.write(layer, pos, k[lo:lo + n], v[lo:lo + n])
            end = int(pos[-1]) + 1
            outs.append(_attend(q[lo:lo + n], cache.k[layer][:, :end], cache.v[layer][:, :end], pos, mixer.scale))
            lo += n
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        out = mixer.o_proj(o.reshape(x.shape[0], -1).float() * torch.sigmoid(gate.float()), few)
        x = blk.finish(x, out, few)
        normed = rms_norm(x, self.final_norm, self.eps, self.dtype)
        if not len(logit_rows):
            return normed, None
        return normed, self.logits(normed[list(logit_rows)])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, V] of the head's normed output rows [N, H] ([N, rows] with a draft head)."""
        if self.draft_head is not None:
            return self.draft_head(normed, normed.shape[0] <= STEP_ROWS).float()
        return self.model.lm_head(normed, step=True).float()  # an int8 lm_head: its int8 kernel


class PromptDrafts:
    """The head run over a prompt while prefill computes it: pass it as Engine.prefill's `normed` and every chunk's
    final-normed hidden states are paired with the tokens after them and fed to the head at once (the last one
    waits for the next chunk), so the head never holds the whole prompt's hidden states. `tensors()` is the draft
    state a hand-off carries (state_spec.draft_shapes): the head's KV of positions 0 .. T-2 and the hidden state
    at T-1, which the first token decode feeds completes."""

    def __init__(self, head: MTPHead, token_ids: list[int]):
        self.head = head
        self.ids = token_ids
        self.cache = head.new_cache(len(token_ids))
        self.pos = 0  # positions whose hidden states arrived
        self.pending: torch.Tensor | None = None  # the hidden state at pos - 1

    def restore(self, kv: dict[str, torch.Tensor], hidden: torch.Tensor, num_tokens: int) -> None:
        """Start after a cached prefix of `num_tokens` tokens: `kv` its head KV (mtp.{l}.k/v, [Hkv, num_tokens-1,
        D]), `hidden` the hidden state at num_tokens - 1 (what a prefix-cache hit keeps: prefill/prefix.py)."""
        self.cache.load(kv, num_tokens - 1)
        self.pos = num_tokens
        self.pending = hidden.to(self.head.model.device).clone()

    def append(self, hidden: torch.Tensor) -> None:
        first = self.pos if self.pending is None else self.pos - 1
        if self.pending is not None:
            hidden = torch.cat([self.pending[None], hidden])
        self.pos += hidden.shape[0] - (first != self.pos)
        if hidden.shape[0] > 1:
            dev = hidden.device
            with torch.inference_mode():
                self.head.forward(hidden[:-1], torch.tensor(self.ids[first + 1:self.pos], device=dev),
                                  torch.arange(first, self.pos - 1, device=dev), self.cache, logits="none")
        self.pending = hidden[-1].clone()

    def block(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """What a prefix-cache KV block of tokens [lo, hi) keeps of the head: the KV of the positions whose next
        token is in the block, [lo-1, hi-1) ([0, hi-1) for the first), so it depends on the block's prefix only;
        blocks and a hand-off's own part join into positions 0 .. T-2 (the store concatenates .k/.v tensors)."""
        return self.cache.copy_out(max(0, lo - 1), hi - 1)

    def tensors(self, after: int = 0) -> dict[str, torch.Tensor]:
        """The draft state a hand-off carries (state_spec.draft_shapes), less the head KV the blocks of its first
        `after` tokens hold (`block`)."""
        if self.pending is None:
            raise ValueError("no hidden states were fed")
        return self.cache.draft_state(max(0, after - 1), self.pos, self.pending)


def load_head(engine, model_dir) -> MTPHead:
    """The MTP head of `engine`'s checkpoint (WeightError naming the missing mtp.* tensors without one). Where the
    embedding is padded far past the tokenizer (the test and bench presets: 571 tokens, 32,000 rows), drafts get
    logits of the tokenizer's rows only; a real checkpoint's few padding rows keep the shared lm_head. A
    tensor-parallel engine's head is its leader's alone, with its own whole embedding and lm_head rows
    (load_mtp_weights' own_vocab: on Qwen3.6-27B's shapes 2.5 GB each, on the leader only).
    An int8 head (`--quantize int8`, or `--draft-quantize int8` whatever the model's weights are) where a
    decode-step int8 kernel multiplies its rows (CPU, bf16: engine/linear.py int8_step_kernel): its projections
    and its own lm_head rows weight-only int8 (as the model's are under --quantize int8), drafting passes (few
    rows) on that kernel. With --draft-quantize over a model whose lm_head is not int8, the head gets its own int8
    lm_head rows (vocab x hidden bytes: 1.27 GB on Qwen3.6-27B's shapes, where the lm_head is most of what a
    draft pass reads). --draft-quantize where no such kernel runs is a ValueError (the int8 weights would be
    converted at every call: drafting slower, not faster)."""
    from qwenpd.engine.linear import Int8Weight, int8_step_kernel
    from qwenpd.engine.weights import int8_quantize, load_mtp_weights

    asked = engine.engine_config.draft_quantize == "int8"
    kernel = engine.int8_kernel  # --quantize int8's (Engine: int8_step_kernel)
    if asked and kernel is None:
        kernel = int8_step_kernel(torch.empty(0, engine.config.hidden_size, dtype=engine.dtype, device=engine.device))
        if kernel is None:
            raise ValueError(f"--draft-quantize int8: no int8 kernel multiplies decode-step rows on {engine.device} "
                             f"in {str(engine.dtype).removeprefix('torch.')} (CPU bf16 only): drop it")
    words = engine.grammars.words if engine.grammars is not None else None
    rows = words if words is not None and words < 0.9 * engine.config.vocab_size else None
    if asked and engine.int8_kernel is None and rows is None:
        rows = engine.config.vocab_size  # its own lm_head rows, to be int8 (the model's stay as they are)
    weights = load_mtp_weights(model_dir, engine.config, engine.dtype, draft_rows=rows, own_vocab=engine.tp > 1)
    if kernel is not None:  # (--quantize int8 without a decode-step kernel: the head stays as loaded)
        # a tied tensor-parallel head's lm_head rows are its embedding (load_mtp_weights): they get an int8 copy,
        # the embedding stays as loaded for its lookups
        weights = {name: Int8Weight(*int8_quantize(t, engine.dtype)).to(engine.dtype) if _projection(name) else t
                   for name, t in weights.items()}
    return MTPHead(engine.config, {name: t.to(engine.device) for name, t in weights.items()}, engine.model)


def _projection(name: str) -> bool:
    """Whether the head's tensor `name` is a matmul weight (not a norm, not the embedding)."""
    return name == DRAFT_HEAD or name == MTP + "fc.weight" or (
        name.startswith(MTP + "layers.") and name.endswith("_proj.weight"))
