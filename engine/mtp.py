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
model's AttentionMixer weights and projections). Its KV is paged like the model's: the engine's paged cache holds
the head's layers after the attention layers' (engine/kv_cache.py), and a sequence's head KV of position t sits at
the slot of its model KV of t, in the same pages (MTPCache): the head needs no block table of its own, its bytes
come out of the KV budget the decode service admits sequences against, a sequence's pages are freed at once, and
the prefix cache and hand-offs copy it as they copy the model's. Drafting rows attend with the CPU decode path's
kernel (kernels/paged_attention attend_pages: blocks of pages in fp32, an online softmax), a prompt's chunk with
the prefill kernel. Drafts only decide how many tokens a verify pass accepts, never which tokens come out, so the
head needs no batch invariance.
"""

from __future__ import annotations

import torch

from qwenpd.engine.config import FULL, ModelConfig
from qwenpd.engine.kv_cache import PagedKVCache, SequenceKV
from qwenpd.engine.layers import Rotary, rms_norm
from qwenpd.engine.linear import Linear, held_bytes
from qwenpd.engine.model import Block, HybridModel
from qwenpd.engine.pages import OutOfPages, pages_for
from qwenpd.engine.state import HybridState
from qwenpd.engine.weights import DRAFT_EMBED, DRAFT_HEAD, MTP
from qwenpd.kernels import ops
from qwenpd.kernels.paged_attention.paged import attend_pages

STEP_ROWS = 16  # head passes of at most this many rows (drafting ones) take Linear's decode-step path


class MTPCache:
    """One sequence's KV of the head's layers: the head's pools of the engine's paged cache at the sequence's own
    pages (`kv`, its model KV's block table), position t at the slot of the model's token t (module doc). Entries
    written by drafts past the verified tokens are overwritten when the verified tokens are fed
    (speculative.Drafter.draft)."""

    def __init__(self, kv: SequenceKV):
        self.kv = kv

    @classmethod
    def new(cls, kv_cache: PagedKVCache, tokens: int) -> "MTPCache":
        """A cache on pages of its own for `tokens` positions (no model KV beside it: tests, bench/distill_mtp.py)."""
        kv = kv_cache.sequence()
        kv.reserve(tokens)
        return cls(kv)

    def _pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.kv.cache
        j = cache.draft_index(layer)
        return cache.k[j], cache.v[j]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, Hkv, D] of positions start .. start+n-1 (pages reserved: OutOfPages otherwise)."""
        end = start + k.shape[0]
        if pages_for(end, self.kv.cache.page_size) > len(self.kv.pages):
            raise OutOfPages(f"the head's KV of position {end - 1} is past the sequence's {len(self.kv.pages)} pages")
        k_pool, v_pool = self._pools(layer)
        ops.decode_write_kv(k_pool, v_pool, torch.tensor(self.kv.slots(start, end), device=k.device), k, v)

    def attend(self, layer: int, q: torch.Tensor, start: int, scale: float) -> torch.Tensor:
        """Causal attention of q [n, Hq, D] (fp32) at positions start .. start+n-1 over this sequence's head KV of
        the positions up to each (written): fp32 [n, Hq, D]. Drafting passes and catch-ups (n <= ATTEND_ROWS): the
        CPU decode kernel's blocks (attend_pages); more rows (a prompt's chunk): the prefill kernel."""
        n = q.shape[0]
        end = start + n
        k_pool, v_pool = self._pools(layer)
        pages = self.kv.page_tensor()
        if n > ATTEND_ROWS:
            table = pages[:pages_for(end, self.kv.cache.page_size)]
            start_t = torch.tensor([start], device=q.device)
            return ops.prefill_paged_attention(q.to(k_pool.dtype), k_pool, v_pool, table, start_t, scale).float()
        positions = torch.arange(start, end, device=q.device) if n > 1 else None
        return attend_pages(q, k_pool, v_pool, pages, end, scale, positions)

    def load(self, kv: dict[str, torch.Tensor], positions: int) -> None:
        """Write a draft state's head KV (mtp.{l}.k/v, [Hkv, positions, D]: state_spec.draft_shapes) as positions
        0 .. positions-1; ValueError if it covers another number of positions."""
        if positions < 1:
            return
        cache = self.kv.cache
        for layer in range(cache.draft_layers):
            k, v = kv[f"mtp.{layer}.k"], kv[f"mtp.{layer}.v"]
            if k.shape[1] != positions or v.shape[1] != positions:
                raise ValueError(f"the head KV covers {k.shape[1]} positions, not {positions}")
            self.kv.load(cache.draft_index(layer), k, v)

    def copy_out(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """The head KV of positions [lo, hi) (mtp.{l}.k/v, [Hkv, hi-lo, D], host copies): `load`'s layout."""
        out = {}
        cache = self.kv.cache
        for layer in range(cache.draft_layers):
            k, v = self.kv.read(cache.draft_index(layer), lo, max(lo, hi))
            out[f"mtp.{layer}.k"], out[f"mtp.{layer}.v"] = k.cpu(), v.cpu()
        return out

    def draft_state(self, lo: int, num_tokens: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The draft state after `num_tokens` tokens (state_spec.draft_shapes), less the head KV of positions
        before `lo` (which prefix-cache blocks hold): the KV of positions [lo, num_tokens-1) and `hidden`, the
        final-normed hidden state at num_tokens-1 (host copies)."""
        from qwenpd.engine.state_spec import DRAFT_HIDDEN

        out = self.copy_out(lo, num_tokens - 1)
        out[DRAFT_HIDDEN] = hidden.to(self.kv.cache.dtype).cpu()
        return out


ATTEND_ROWS = 64  # up to this many query rows MTPCache.attend runs on the decode kernel's blocks; more: prefill's


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
            first = int(positions[lo])
            cache.write(layer, first, k[lo:lo + n], v[lo:lo + n])
            outs.append(cache.attend(layer, q[lo:lo + n], first, mixer.scale))
            lo += n
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        out = mixer.o_proj(o.reshape(x.shape[0], -1) * torch.sigmoid(gate.float()), few)
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
    at T-1, which the first token decode feeds completes. The head's KV goes to the pages of the state the prompt
    is prefilled into (`state`, or `bind` it before the first chunk)."""

    def __init__(self, head: MTPHead, token_ids: list[int], state: HybridState | None = None):
        self.head = head
        self.ids = token_ids
        self.cache: MTPCache | None = None if state is None else MTPCache(state.kv)
        self.pos = 0  # positions whose hidden states arrived
        self.pending: torch.Tensor | None = None  # the hidden state at pos - 1

    def bind(self, state: HybridState) -> None:
        """The state the prompt is prefilled into: the head's KV goes to its pages."""
        self.cache = MTPCache(state.kv)

    def restore(self, state: HybridState, kv: dict[str, torch.Tensor], hidden: torch.Tensor, num_tokens: int
                ) -> None:
        """Start after a cached prefix of `num_tokens` tokens, restored into `state` (bound): `kv` its head KV
        (mtp.{l}.k/v, [Hkv, num_tokens-1, D]), `hidden` the hidden state at num_tokens - 1 (what a prefix-cache hit
        keeps: prefill/prefix.py)."""
        self.bind(state)
        self.cache.load(kv, num_tokens - 1)
        self.pos = num_tokens
        self.pending = hidden.to(self.head.model.device).clone()

    def append(self, hidden: torch.Tensor) -> None:
        if self.cache is None:
            raise ValueError("PromptDrafts: bind(state) before the prompt's first chunk")
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
        if self.pending is None or self.cache is None:
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
