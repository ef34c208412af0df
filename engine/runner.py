"""Host bookkeeping around the model's two graphs: token ids, KV slots, block tables and positions become
tensors on the device, padded to static buckets when the graphs are compiled.

Eager (no buckets): every shape is exact. Compiled (`--compile`): `torch.compile(fullgraph=True, dynamic=False)`
of HybridModel.prefill_graph and .decode_graph, one graph per bucket: a prefill chunk is padded to a chunk-length
bucket (padding tokens are masked out of the DeltaNet states and write their K/V to the null page, so no state
changes), a decode batch to a batch-size bucket (padding rows use free batch slots and the null page), block tables
to a width bucket (null pages, masked). `warm_up` compiles every bucket; serving never recompiles. A service
compiles only the graphs it runs (`graphs`: prefill or decode); the other one runs eagerly, on the same padded
shapes.

Regional compilation (`regional=True`, the default on CPU) compiles each layer kind and the head instead of the
whole graph (a DeltaNet layer's decode step as three regions around its recurrence, which a speculative verify
pass runs apart: engine/speculative.py): a region is traced and code-generated once per layer kind and shape and
serves every layer of that kind (the weights are its inputs), and a DeltaNet layer's region does not depend on the
block-table width, so a width bucket adds only the attention layer's region. On `small` it cuts the warm-up of
every bucket about threefold; the price is one compiled call per layer instead of one per step (tens of
microseconds on CPU, where a step takes milliseconds; a DeltaNet layer's decode step is three calls). Whole graphs
(`regional=False`) suit devices where launches are dear (neuron, CUDA).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.pages import NULL_PAGE, pages_for
from qwenpd.engine.layers import VECTOR_SPAN
from qwenpd.engine.model import HybridModel
from qwenpd.engine.state import HybridState

log = logging.getLogger("qwenpd.compile")

GRAPHS = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class ChunkMedia:
    """What a prefill chunk of an image prompt adds to its token ids (engine/media.py PromptMedia.chunk):
    rows [n] of the chunk whose embeddings are the vision tower's `values` [n, H], and every row's mRoPE
    positions `rope` [T, 3] (device tensors)."""

    rope: torch.Tensor
    embeds: tuple[torch.Tensor, torch.Tensor] | None


def decode_row_multiple(c: ModelConfig) -> int:
    """Rows an eager decode step on CPU is padded to a multiple of, so that a sequence's logits are the same bits
    in any batch and any slot (crash resume replays a sequence in another batch than the one that decoded it).

    torch's CPU elementwise loops run vectors over the first multiple of VECTOR_SPAN elements of a tensor and
    scalar code over the rest; for exp, sigmoid, silu, softplus, cos/sin and fused multiply-adds the vector and
    scalar results differ in the last bits. With rows a multiple of this, every such op of the step over
    contiguous rows (their sizes per row below) covers a whole number of VECTOR_SPANs, so no element takes the
    scalar path. The per-head decay and write strength and the rotary angles are computed padded to whole spans
    (engine/layers.py) and sliced after, so they need no rows; strided views loop row by row, the same in any
    batch. Matmuls (engine/linear.py) and paged attention (fixed-width tiles) are row-independent by
    construction. 1 for Qwen3.6-27B and `small`; tests/engine/test_batch_invariance.py checks it."""
    per_row = (c.conv_dim, c.linear_value_dim,  # conv silu; gated norm silu
               c.linear_key_head_dim * c.linear_value_head_dim,  # state decay and update, per head (fma)
               c.intermediate_size, c.num_attention_heads * c.head_dim,  # MLP silu; attention output gate
               c.vocab_size, c.hidden_size)
    return VECTOR_SPAN // math.gcd(VECTOR_SPAN, *per_row)


_REGIONS = {"prefill": ("linear_prefill", "attention_prefill", "logits"),
            "decode": ("linear_decode_in", "linear_decode_core", "linear_verify_inputs", "linear_decode_out",
                       "attention_decode", "normed_logits")}


class CompiledLayers:
    """The model's layer steps and head (HybridModel.linear_prefill, ..., .logits), those of `graphs` compiled
    with `opts`: the `layers` a regionally compiled graph runs."""

    def __init__(self, model: HybridModel, graphs: tuple[str, ...], opts: dict):
        names = {name for g in graphs for name in _REGIONS[g]}
        for name in {name for names_ in _REGIONS.values() for name in names_}:
            fn = getattr(model, name)
            setattr(self, name, torch.compile(fn, **opts) if name in names else fn)


def _geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= factor
    return tuple(sorted({*out, hi}))


def pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest compiled bucket {buckets[-1]}")


@dataclass(frozen=True, slots=True)
class Buckets:
    """Static shapes the compiled graphs exist for: prefill chunk lengths, decode batch sizes, block-table widths
    (pages per sequence)."""

    chunks: tuple[int, ...]
    batches: tuple[int, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("chunks", "batches", "widths"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"{name} buckets must be increasing positive ints, got {values}")

    @classmethod
    def default(cls, chunk_size: int, max_batch: int, max_context: int, page_size: int) -> "Buckets":
        """Chunks {64, chunk_size} (no chunk longer than max_context); batches 1, 4, 16, ... up to max_batch;
        widths x4 from 512 tokens of pages up to max_context."""
        max_pages = pages_for(max_context, page_size)
        chunk_size = min(chunk_size, max_context)
        return cls(tuple(sorted({min(64, chunk_size), chunk_size})), _geometric(1, max_batch, 4),
                   _geometric(min(max_pages, pages_for(512, page_size)), max_pages, 4))

    def at_least(self, rows: int) -> "Buckets":
        """These buckets with no batch bucket below `rows` (those become `rows`)."""
        return replace(self, batches=tuple(sorted({max(b, rows) for b in self.batches})))

    def covering(self, rows: int) -> "Buckets":
        """These buckets with batch buckets up to `rows` (x4 steps past the largest): a speculative verify pass runs
        each sequence's positions as rows of the decode step's regions (engine/speculative.py)."""
        if rows <= self.batches[-1]:
            return self
        return replace(self, batches=tuple(sorted({*self.batches, *_geometric(self.batches[-1], rows, 4)})))

    def count(self, graphs: tuple[str, ...] = GRAPHS) -> int:
        """How many graphs compiling `graphs` ("prefill", "decode") over these buckets makes."""
        per_width = {"prefill": len(self.chunks), "decode": len(self.batches)}
        return len(self.widths) * sum(per_width[g] for g in graphs)


def min_compiled_rows(c: ModelConfig) -> int:
    """Rows a compiled decode step runs at least on CPU, so that inductor reduces every row the same way in every
    batch bucket. Its CPU code splits a row's reduction over the threads (partial sums joined, another order)
    where the rows' loop is too short beside it: always for a lone row (the reduction is then the whole loop
    nest), and for R rows when R * 300 < the reduction's vector steps (torch/_inductor/codegen/cpp.py
    `max_parallel_depth`). Reductions over the hidden size (the RMSNorms) are the longest a row has: at 8 fp32
    lanes (AVX2; AVX-512's 16 halve the steps) rows >= hidden / 2400. So at least 2 rows (`small`, hidden 1024:
    a sequence decoded alone drifted from the same sequence in bucket 4 a few tokens in, before this), 3 for
    Qwen3.6-27B's 5120 (tests/engine/test_batch_invariance.py checks it under AVX2 code). A padding row costs a
    free slot's recurrence and its share of the row-wise ops."""
    return max(2, -(-c.hidden_size // (300 * 8)))


_GRAPHS_IN_PROCESS = 0  # graphs compiled by every GraphRunner of this process (the recompile limit above)


class GraphRunner:
    """Runs prefill chunks and decode steps of `model` with pages from `states`' cache; with `buckets`, padded to
    them and compiled (the kinds in `graphs`; then the KV cache must not grow), eager otherwise."""

    def __init__(self, model: HybridModel, buckets: Buckets | None = None, backend: str = "inductor",
                 graphs: tuple[str, ...] = GRAPHS, regional: bool = False, verify: tuple[int, int] = (0, 0)):
        if not set(graphs) <= set(GRAPHS):
            raise ValueError(f"graphs must be among {GRAPHS}, got {graphs}")
        if buckets is not None and model.device.type == "cpu":  # inductor's CPU code (min_compiled_rows)
            buckets = buckets.at_least(min_compiled_rows(model.config))
        self.model, self.buckets, self.device = model, buckets, model.device
        self.prefill_fn, self.decode_fn = model.prefill_graph, model.decode_graph
        self.graphs = graphs if buckets is not None else ()
        # eager on CPU: decode rows padded for batch invariance (decode_row_multiple); compiled: to the buckets
        self.row_multiple = decode_row_multiple(model.config) if buckets is None and self.device.type == "cpu" else 1
        self.warmup_s = 0.0
        self.layers: CompiledLayers | None = None  # the decode graph's regions, regionally compiled
        # (decode rows, tokens) of the speculative verify passes that run in two parts (engine/speculative.py): B
        # sequences (rows: their decode step's) feeding n tokens each, for every B and 2 <= n <= K + 1 of `verify`
        sequences, tokens = verify if regional and "decode" in self.graphs else (0, 0)
        self.two_part = tuple(sorted({(self.decode_rows(b), n) for b in range(1, sequences + 1)
                                      for n in range(2, tokens + 1)}))
        opts = dict(fullgraph=True, dynamic=False, backend=backend)
        if self.graphs:  # one graph per bucket of one function: past dynamo's limit per function (8) it would fail
            # dynamo counts per code object, over every engine this process compiles (another model, dtype or
            # quantization compiles the same functions again)
            global _GRAPHS_IN_PROCESS
            _GRAPHS_IN_PROCESS += buckets.count(self.graphs) + len(self.two_part)
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, _GRAPHS_IN_PROCESS)
        if regional and self.graphs:
            # each graph its own regions: the head (`logits`) is a region of both, and a graph that is not compiled
            # runs it eagerly rather than the other's compiled region at a shape never warmed up
            prefill_layers = CompiledLayers(model, tuple(g for g in self.graphs if g == "prefill"), opts)
            self.layers = CompiledLayers(model, tuple(g for g in self.graphs if g == "decode"), opts)
            self.prefill_fn = functools.partial(model.prefill_graph, layers=prefill_layers)
            self.decode_fn = functools.partial(model.decode_graph, layers=self.layers)
        else:
            if "prefill" in self.graphs:
                self.prefill_fn = torch.compile(model.prefill_graph, **opts)
            if "decode" in self.graphs:
                self.decode_fn = torch.compile(model.decode_graph, **opts)

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _pad(self, buckets: tuple[int, ...] | None, n: int, what: str) -> int:
        return n if buckets is None else pick(buckets, n, what)

    def decode_rows(self, n: int) -> int:
        """Rows a decode step of n sequences runs (its slot tensors need that many)."""
        if self.buckets is not None:
            return pick(self.buckets.batches, n, "decode batch of")
        return -(-n // self.row_multiple) * self.row_multiple

    def table_width(self, pages: int) -> int:
        """Width of a block table covering `pages` pages (a width bucket, compiled)."""
        return self._pad(None if self.buckets is None else self.buckets.widths, pages, "block table of")

    def prefill_chunk(self, token_ids: list[int], state: HybridState, all_logits: bool = False,
                      normed: list | None = None, media: "ChunkMedia | None" = None) -> torch.Tensor:
        """Consume token_ids (T host ints) into `state` (in place). Returns logits of the last token [V] (all
        [T, V] with all_logits, eager only). `normed` gets the final-normed hidden states [T, H] of the real tokens
        (its `append`). `media`: the chunk's image embeddings and mRoPE positions; such a chunk, and every chunk of a
        sequence whose rotary positions are shifted (state.rope_delta), runs the eager graph at its exact shape."""
        if media is not None or state.rope_delta:
            return self._prefill_media(token_ids, state, all_logits, normed, media)
        t, start, b = len(token_ids), state.num_tokens, self.buckets
        state.reserve(start + t)
        padded = self._pad(None if b is None else b.chunks, t, "prefill chunk of")
        width = self.table_width(len(state.kv.pages))
        pad = padded - t
        slots = state.kv.slots(start, start + t) + [NULL_PAGE] * pad  # padding writes to the null page (slot 0)
        mask = None if b is None else torch.arange(padded, device=self.device) < t
        last = self._long(list(range(t)) if all_logits else [t - 1])
        cache = state.kv.cache
        args = (self._long(token_ids + [0] * pad), state.conv, state.recurrent, cache.k, cache.v, self._long(slots),
                self._long(state.kv.table(width)), self._long([start]), mask, last)
        padded_normed: list = []
        with torch.inference_mode():  # inputs are made outside it: graphs guard on the kind of tensor
            logits = self.prefill_fn(*args) if normed is None else self.prefill_fn(*args, normed=padded_normed)
        if normed is not None:
            normed.append(padded_normed[0][:t])  # the real tokens' rows
        state.num_tokens = start + t
        state.token_ids.extend(token_ids)
        return logits if all_logits else logits[0]

    def _prefill_media(self, token_ids: list[int], state: HybridState, all_logits: bool, normed: list | None,
                       media: "ChunkMedia | None") -> torch.Tensor:
        t, start = len(token_ids), state.num_tokens
        state.reserve(start + t)
        if media is not None:
            rope, embeds = media.rope, media.embeds
        else:
            rope = torch.arange(start, start + t, device=self.device) + state.rope_delta
            embeds = None
        last = self._long(list(range(t)) if all_logits else [t - 1])
        cache = state.kv.cache
        with torch.inference_mode():
            logits = self.model.prefill_graph(
                self._long(token_ids), state.conv, state.recurrent, cache.k, cache.v,
                self._long(state.kv.slots(start, start + t)), self._long(state.kv.table(len(state.kv.pages))),
                self._long([start]), None, last, normed=normed, embeds=embeds, rope=rope)
        state.num_tokens = start + t
        state.token_ids.extend(token_ids)
        return logits if all_logits else logits[0]

    def decode_step(self, token_ids: list[int], states: list[HybridState], conv: list[torch.Tensor],
                    recurrent: list[torch.Tensor], normed: list | None = None) -> torch.Tensor:
        """One token for each of B sequences. conv[j] [>=B', D, W-1] and recurrent[j] [>=B', Hv, dk, dv] are the
        batch's slot tensors, B' = decode_rows(B) (rows past B are free slots, used as padding rows); KV goes to
        each state's pages. Returns logits [B, V]; `normed` gets the final-normed hidden states [B, H] appended
        (model.decode_graph's: eager or regional graphs only)."""
        for s in states:
            s.reserve(s.num_tokens + 1)
        n = len(states)
        rows = self.decode_rows(n)
        width = self.table_width(max(len(s.kv.pages) for s in states))
        pad = rows - n
        positions = [s.num_tokens for s in states]
        rope = [p + s.rope_delta for s, p in zip(states, positions)]
        slots = [s.kv.slots(p, p + 1)[0] for s, p in zip(states, positions)]
        tables = [s.kv.table(width) for s in states] + [[NULL_PAGE] * width] * pad
        cache = states[0].kv.cache
        args = (self._long(token_ids + [0] * pad), [c[:rows] for c in conv], [r[:rows] for r in recurrent], cache.k,
                cache.v, self._long(slots + [0] * pad), self._long(tables), self._long(positions + [0] * pad),
                self._long(rope + [0] * pad))
        if normed is not None and "decode" in self.graphs and self.layers is None:
            raise ValueError("a whole-graph decode step gives no hidden states (speculation needs regional graphs)")
        with torch.inference_mode():
            if normed is None:
                logits = self.decode_fn(*args)
            else:
                out: list = []
                logits = self.decode_fn(*args, normed=out)
                normed.append(out[0][:n])
        for s, tok in zip(states, token_ids):
            s.num_tokens += 1
            s.token_ids.append(tok)
        return logits[:n]

    def warm_up(self, scratch: HybridState, max_batch: int) -> float:
        """Compile (run once) every bucket of the compiled graphs on scratch inputs that touch only the null page and
        scratch state; returns the seconds it took. Inputs are made outside inference mode, like the batch slots they stand for
        (inference tensors would guard differently)."""
        if not self.graphs:
            return 0.0
        t0 = time.perf_counter()
        cache, b = scratch.kv.cache, self.buckets
        slots_conv = [c.expand(max_batch, *c.shape).clone() for c in scratch.conv]
        slots_rec = [r.expand(max_batch, *r.shape).clone() for r in scratch.recurrent]
        total, done = b.count(self.graphs), 0
        for width in b.widths:
            table = self._long([NULL_PAGE] * width)
            for chunk in b.chunks if "prefill" in self.graphs else ():  # distinct tensors per argument: graphs guard on aliasing too
                ids, slots, start, last = (self._long([0] * n) for n in (chunk, chunk, 1, 1))
                mask = torch.zeros(chunk, dtype=torch.bool, device=self.device)
                started = time.perf_counter()
                with torch.inference_mode():
                    self.prefill_fn(ids, scratch.conv, scratch.recurrent, cache.k, cache.v, slots, table, start,
                                    mask, last)
                done += 1
                _progress(done, total, f"prefill chunk {chunk}, width {width}", started, t0)
            for rows in b.batches if "decode" in self.graphs else ():
                ids, slots, positions, rope = (self._long([0] * rows) for _ in range(4))
                tables = self._long([[NULL_PAGE] * width] * rows)
                started = time.perf_counter()
                with torch.inference_mode():
                    self.decode_fn(ids, [c[:rows] for c in slots_conv], [r[:rows] for r in slots_rec], cache.k,
                                   cache.v, slots, tables, positions, rope)
                done += 1
                _progress(done, total, f"decode batch {rows}, width {width}", started, t0)
        if self.two_part:
            self._warm_two_part(slots_conv[0], t0)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s


    def _warm_two_part(self, conv: torch.Tensor, t0: float) -> None:
        """Compile linear_verify_inputs for every shape of `two_part`, on inputs made as a verify pass makes them
        (engine/speculative.py _prepared): the rows inference tensors, the conv state a fresh ordinary one."""
        blk = next((blk for blk in self.model.blocks if blk.is_linear), None)
        for i, (rows, n) in enumerate(self.two_part if blk is not None else ()):
            started = time.perf_counter()
            state = conv.new_zeros((rows, *conv.shape[1:]))
            with torch.inference_mode():
                x = self.model.embed_tokens(self._long([0] * (rows * n)))
                mixed, _, beta, g = self.model.linear_decode_in(blk, x)
                self.layers.linear_verify_inputs(blk, mixed.contiguous(), beta.contiguous(), g.contiguous(), state)
            _progress(i + 1, len(self.two_part), f"verify inputs of {rows} rows x {n} tokens", started, t0)


def _progress(done: int, total: int, what: str, started: float, t0: float) -> None:
    """One line per compiled bucket (INFO on qwenpd.compile): which, how many are left, how long it took."""
    now = time.perf_counter()
    log.info("compiled %d/%d: %s in %.1f s (%.0f s so far, %d left)", done, total, what, now - started, now - t0,
             total - done)
