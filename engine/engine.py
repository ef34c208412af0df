"""The engine: a loaded model plus the two code paths the services use — chunked prefill and batched decode."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.constraint import Grammars
from qwenpd.engine.device import resolve_device
from qwenpd.engine.host import keep_freed_memory
from qwenpd.engine.kv_cache import KVCacheSize, PagedKVCache, draft_layers, resolve_kv_cache_bytes
from qwenpd.engine.linear import held_bytes, int8_step_kernel
from qwenpd.engine.model import DeltaNetKernels, HybridModel
from qwenpd.engine.runner import GRAPHS, Buckets, GraphRunner
from qwenpd.engine import state_spec
from qwenpd.engine.engine_config import MAX_SPECULATIVE_TOKENS, EngineConfig
from qwenpd.engine.state import HybridState
from qwenpd.engine.tp import state_io
from qwenpd.engine.tp.calls import ENGINE_HANDLE, Mirror, adopt, cross_rank, mirror_new
from qwenpd.engine.tp.group import TPGroup
from qwenpd.engine.tp.launch import launch
from qwenpd.engine.tp.plan import ShardPlan
from qwenpd.engine.tokenizer import Tokenizer
from qwenpd.engine.vision import PromptMedia, VisionTower, load_vision_weights, vision_fingerprint
from qwenpd.engine.weights import load_weights
from qwenpd.kernels.gated_delta_rule import cpu as delta_cpu
from qwenpd.kernels.ops import register_device_kernels

if TYPE_CHECKING:
    from qwenpd.engine.speculative import Verified

SCORE_CHUNK = 128  # prompt scoring: positions per chunk, whose logits [T, V] are held at once
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _deltanet_family(name: str, device_type: str) -> str:
    """The DeltaNet kernel family of an engine on `device_type`: "torch" (the reference ops; NKI kernels registered
    on neuron), "fla" (flash-linear-attention's chunked kernel on CUDA; tf32 inside) or "nki" (called directly)."""
    from qwenpd.kernels import fla

    if name == "fla" and (device_type != "cuda" or not fla.available()):
        raise ValueError("deltanet_kernels='fla' needs a CUDA device and the flash-linear-attention package")
    return name


WARM_UP_TOKENS = 512  # Engine.warm_up's prefill: one chunk of the default size (prefill's chunk_size)


class Engine:
    """A Qwen3.5/3.6 hybrid model ready to prefill and decode on one torch device (cpu, cuda, neuron, meta).

    Built from an EngineConfig (`Engine(config)`), or from a checkpoint directory and EngineConfig fields as
    keywords (`Engine(model_dir, dtype="float32")`): the options are declared and checked there, once.

    Weights, KV (one paged cache, `kv_cache_bytes` big: bytes, or a fraction of the memory free on the device once
    the weights are loaded), DeltaNet state and logits live on `self.device`; only token ids cross to and from the
    host.

    With `tp` > 1 this process is rank 0 of a tensor-parallel group: it starts ranks 1..tp-1 (each loads only
    its shard of the weights) and every cross-rank call below runs on all of them in lockstep (engine/tp/).
    `config` is always the full model; `local_config` is what this rank computes. State crosses the engine's
    boundary (state_from_tensors, HybridState.to_tensors, ...) in the canonical full-tensor layout
    (engine/state_spec.py), so any degree reads what any other wrote. `close()` stops the other ranks."""

    def __init__(self, config: EngineConfig | str | Path, *, group: TPGroup | None = None, **options: Any):
        if not isinstance(config, EngineConfig):
            config = EngineConfig(model_dir=str(config), **options)
        elif options:
            raise TypeError("give an EngineConfig or a model directory with options, not both")
        self.engine_config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # activations reuse freed memory, not fresh zero-filled pages (engine/host.py)
        threads = config.threads
        if threads is None and config.tp > 1 and self.device.type == "cpu":  # the ranks share the host's cores
            threads = max(1, (os.cpu_count() or 1) // config.tp)
        if threads is not None:
            torch.set_num_threads(threads)
        self.config = ModelConfig.from_pretrained(config.model_dir)
        name = self.config.torch_dtype if config.dtype == "auto" else config.dtype
        if name not in DTYPES:
            raise ValueError(f"checkpoint dtype {name!r} is not supported; pass --dtype float32 or bfloat16")
        self.dtype = DTYPES[name]
        self.plan = ShardPlan(self.config, config.tp, 0 if group is None else group.rank)  # ShardingError if misfit
        if config.tp > 1 and group is None:
            group = launch(config)
        self.group = group
        self.mirror = None if group is None else Mirror(group, ENGINE_HANDLE)
        try:
            self._load(config.model_dir, config.deltanet_kernels, config.kv_cache_bytes, config.pages)
            if config.warm_up and (group is None or group.leader):  # followers run the leader's warm-up calls
                self.warm_up()
        except BaseException:
            self.close()
            raise

    def _load(self, model_dir: str | Path, deltanet_kernels: str, kv_cache_bytes: KVCacheSize | None, page_size: int
              ) -> None:
        sharded = self.plan.degree > 1
        self.local_config = self.plan.local_config if sharded else self.config
        weights, self.fingerprint = load_weights(model_dir, self.config, self.dtype,
                                                 self.plan.weight_ranges if sharded else None,
                                                 quantize=self.engine_config.quantize)
        # weights held: as loaded (FP8 and --quantize fp8 are multiplied in the model dtype here, int8 as int8)
        self.weight_bytes = sum(held_bytes(t) for t in weights.values())
        # which kernel family multiplies decode steps by int8 weights (ours is built here, ~10 s once a machine,
        # not in the first request); ours and aten's give other bits, so it joins the fingerprint: a prefill and a
        # decode (or a restarted decode) that fell back to another kernel refuse each other's hand-offs
        self.int8_kernel = (int8_step_kernel(torch.empty(0, 64, dtype=self.dtype, device=self.device))
                            if self.engine_config.quantize == "int8" else None)
        if self.int8_kernel:
            self.fingerprint = hashlib.sha256(f"{self.fingerprint} int8 kernel {self.int8_kernel}".encode()).hexdigest()
        # a CPU decode step's DeltaNet state update runs kernels/gated_delta_rule/cpu_step.cpp where it builds (here,
        # ~10 s once a machine, not in the first request). Not in the fingerprint: the kernel continues a state, it
        # does not change what a handed-off state means (nor does the device: a CPU prefill hands off to a CUDA
        # decode, whose step is the torch code)
        self.delta_step_kernel = (("cpp" if delta_cpu.load() else "torch") if self.device.type == "cpu"
                                  else None)
        weights = {name: t.to(self.device) for name, t in weights.items()}
        family = _deltanet_family(deltanet_kernels, self.device.type)
        self.kernel_family = register_device_kernels(self.device.type) if family == "torch" else family
        if self.group is not None:
            self.group.config = self.config
        self.model = HybridModel(self.local_config, weights, DeltaNetKernels.named(family), self.group)
        del weights  # what the model did not keep (unfused copies) is freed before free memory is measured
        # the vision tower of a multimodal checkpoint (engine/vision.py), before free memory is measured for the KV
        # cache; under tensor parallelism it runs on the leader only (the others receive its output)
        self.vision = None
        self.vision_fingerprint = ""  # what embeddings stored by an encoder instance are checked against
        if self.config.vision is not None:
            tower, digest = load_vision_weights(model_dir, self.config.vision, self.dtype)
            if self.group is None or self.group.leader:
                self.vision = VisionTower(self.config.vision, tower, self.device)
            del tower
            self.fingerprint = hashlib.sha256(f"{self.fingerprint} vision {digest}".encode()).hexdigest()
            self.vision_fingerprint = vision_fingerprint(self.config.vision, self.dtype, digest)
        self.model_dir = str(model_dir)
        self.tokenizer = Tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        # the checkpoint's MTP head where speculative decoding runs (engine/mtp.py; the leader's alone), loaded
        # before free memory is measured for the KV cache, which holds its KV as more layers of every page
        self.draft_head = None
        heads = draft_layers(self.engine_config, self.config)
        leader = self.group is None or self.group.leader
        if self.engine_config.speculative and leader:  # WeightError naming what a checkpoint without one lacks
            from qwenpd.engine.mtp import load_head

            self.draft_head = load_head(self, model_dir)
        kv_bytes = resolve_kv_cache_bytes(kv_cache_bytes, self.device)
        if self.group is not None and kv_bytes is not None:  # every rank must hold the same number of pages
            shared = isinstance(kv_cache_bytes, float) and self.device.type == "cpu"  # ranks share host memory
            kv_bytes = self.group.agree_bytes(kv_bytes // self.tp if shared else kv_bytes)
        self.kv_cache = PagedKVCache(self.local_config, self.dtype, self.device, page_size, kv_bytes,
                                     draft_layers=heads, draft_kv_heads=self.config.num_key_value_heads,
                                     draft_pools=leader)
        self.eager = self.runner = GraphRunner(self.model)

    @property
    def tp(self) -> int:
        return self.plan.degree

    @functools.cached_property
    def grammars(self) -> Grammars | None:
        """Constrained decoding's factory over this model's tokenizer (None without a tokenizer); built on first
        use (warm_up). Its `words`: the tokenizer's size, past which embedding rows are padding, never sampled."""
        if self.tokenizer is None:
            return None
        # prefetch masks where a core is free while the forward runs: the model on an accelerator, or CPU threads
        # to spare (on a CPU busy with the forward, the mask thread only takes its cores: bench/constrained.py)
        spare = self.device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
        return Grammars(self.tokenizer.to_json(), self.config.vocab_size, self.tokenizer.eos_token_id,
                        prefetch=spare)

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel group (nothing to do otherwise). Idempotent."""
        if self.group is not None and self.group.leader:
            self.group.close()

    def warm_up(self) -> None:
        """Do a first request's one-time work now: a prefill of one default chunk (WARM_UP_TOKENS, fewer where
        the context or a fixed KV cache holds fewer) and two decode steps on a scratch sequence, released after.
        oneDNN creates its kernels on first use and a chunk's activations first grow the process's heap (page
        faults: engine/host.py); without this the first request's time to first token pays for both (a
        512-token prompt of `small` here: 0.41-0.45 s first, 0.38 s after; that included importing
        torch._dynamo, which an eager engine on CPU or CUDA now never does: kernels/ops.py prefill_*). The
        grammar library's view of the tokenizer (every request's sampler reads its size) is built here too."""
        _ = self.grammars
        room = self.config.max_position_embeddings - 2  # two decode steps follow
        if not self.kv_cache.growable:
            room = min(room, self.kv_cache.allocator.free * self.kv_cache.page_size - 2)
        vocab = max(2, self.config.vocab_size)
        ids = [1 + i % (vocab - 1) for i in range(max(1, min(WARM_UP_TOKENS, room)))]
        _, state = self.prefill(ids)
        batch = DecodeBatch(self, max_batch=1)
        batch.add(state)
        try:
            batch.step([1])
            batch.step([2])
        finally:
            batch.remove(state)
            state.release()

    def default_buckets(self, chunk_size: int, max_batch: int, max_context: int | None = None) -> Buckets:
        """Buckets for contexts up to max_context (default: what the model and the KV cache allow); with
        speculative decoding, and the positions the MTP head's drafts may write past it (pages.kv_tokens)."""
        cache = self.kv_cache
        drafts = MAX_SPECULATIVE_TOKENS if self.engine_config.speculative else 0
        limit = min(self.config.max_position_embeddings + drafts, cache.allocator.usable * cache.page_size)
        wanted = max_context + drafts if max_context else limit
        return Buckets.default(chunk_size, max_batch, min(limit, wanted), cache.page_size)

    @cross_rank("engine.compile")
    def compile(self, buckets: Buckets, max_batch: int, backend: str | None = None,
                cache_dir: str | None = None, graphs: tuple[str, ...] = GRAPHS, regional: bool | None = None,
                verify: tuple[int, int] = (0, 0)) -> float:
        """Compile the prefill chunk and decode step (or only those in `graphs`) for every bucket (torch.compile,
        static shapes) and use them from now on; returns the warm-up seconds. `regional` compiles per layer kind
        instead of whole graphs (engine/runner.py; default: on CPU). Needs a fixed-size KV cache (kv_cache_bytes).
        `cache_dir` keeps the compiled artifacts (TORCHINDUCTOR_CACHE_DIR), so a restart reuses them.
        `verify` = (sequences, tokens): the most sequences a speculative verify pass runs and the most tokens each
        feeds (K + 1; engine/speculative.py): the decode regions are compiled for sequences x tokens rows too
        (Buckets.covering), and for its two-part passes (GraphRunner.two_part), and need to be regional."""
        if cache_dir:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        if self.kv_cache.growable:
            raise ValueError("compiled graphs need a fixed-size KV cache: give kv_cache_bytes (--kv-cache-bytes)")
        if buckets.batches[-1] < max_batch:
            raise ValueError(f"largest batch bucket {buckets.batches[-1]} is below max_batch {max_batch}")
        backend = backend or ("neuron" if self.device.type == "neuron" else "inductor")
        regional = self.device.type == "cpu" if regional is None else regional
        verify = verify if verify[0] * verify[1] and "decode" in graphs else (0, 0)
        if verify[0]:
            if not regional:
                raise ValueError("speculative decoding with compiled graphs needs them compiled by region (the "
                                 "verify pass runs the decode step's regions; the default on CPU)")
            buckets = buckets.covering(verify[0] * verify[1])
        self.runner = GraphRunner(self.model, buckets, backend, graphs, regional, verify)
        scratch = HybridState.empty(self.local_config, self.kv_cache)
        return self.runner.warm_up(scratch, self.runner.buckets.batches[-1])

    @cross_rank("engine.new_state", creates=True)
    def new_state(self) -> HybridState:
        return adopt(self, HybridState.empty(self.local_config, self.kv_cache))

    def state_from_tensors(self, tensors: dict[str, torch.Tensor], num_tokens: int, extra_tokens: int = 0,
                           locations: dict[str, tuple[str, int]] | None = None) -> HybridState:
        """A state from checkpoint tensors (full K/V per layer), its KV copied into this engine's pages.
        Raises ValueError on a mismatch with the model. Sharded, `locations` (file, offset of each tensor's data
        in a shared-memory file: LeasedCheckpoint.locations) let every rank read its own slices there; the other
        tensors are scattered from this rank."""
        state_spec.check_tensors(self.config, tensors, num_tokens, self.dtype)
        if self.group is None:
            return self._load_state(tensors, num_tokens, extra_tokens)
        tensors = dict(tensors)  # the rotary offset goes to every rank as a number, the rest in slices
        delta = state_spec.rope_delta_of(tensors)
        tensors.pop(state_spec.ROPE_DELTA, None)
        located = {n: loc for n, loc in (locations or {}).items() if n in tensors}
        return self._load_state(tensors, num_tokens, extra_tokens, located, delta)

    def state_from_prefix(self, kv_blocks: list[dict[str, torch.Tensor]], snapshot: dict[str, torch.Tensor],
                          num_tokens: int, extra_tokens: int = 0) -> HybridState:
        """A state restored from cached KV blocks (in prefix order) and the DeltaNet snapshot after the last of
        them. Raises ValueError on a mismatch with the model."""
        return self.state_from_tensors(state_spec.join_blocks(self.config, kv_blocks, snapshot), num_tokens,
                                       extra_tokens)

    @cross_rank("engine.load_state", creates=True)
    def _load_state(self, tensors: dict[str, torch.Tensor] | None, num_tokens: int, extra_tokens: int,
                    located: dict[str, tuple[str, int]] | None = None, rope_delta: int = 0) -> HybridState:
        if self.group is not None:  # each rank reads (located) or receives only its slices
            tensors = state_io.receive_state(self.group, self.local_config, tensors, num_tokens, self.dtype, located or {})
        assert tensors is not None
        state = HybridState.from_tensors(self.local_config, tensors, num_tokens, self.kv_cache, extra_tokens)
        if self.group is not None:
            state.rope_delta = rope_delta
        return adopt(self, state)

    def check_tokens(self, token_ids: Sequence[int], start: int = 0) -> None:
        """Raise ValueError for ids outside the vocabulary or a context past max_position_embeddings."""
        v = self.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < v]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {v})")
        if start + len(token_ids) > self.config.max_position_embeddings:
            raise ValueError(f"context of {start + len(token_ids)} tokens exceeds the model's maximum "
                             f"{self.config.max_position_embeddings}")

    def prefill(self, token_ids: Sequence[int], state: HybridState | None = None, chunk_size: int = 512,
                boundaries: Sequence[int] = (), on_chunk: Callable[[HybridState], None] | None = None,
                normed=None, media: PromptMedia | None = None) -> tuple[torch.Tensor, HybridState]:
        """Chunked context encoding of `token_ids` on top of `state` (a fresh state when None).

        Chunks hold at most `chunk_size` tokens and also end exactly at every absolute position in
        `boundaries` (where a caller snapshots state). `on_chunk(state)` runs after every chunk; it may raise
        to abandon the work (deadline, cancellation). `normed` (eager or regionally compiled; under tensor
        parallelism the leader's): gets each chunk's final-normed hidden states [T, H] by `append` (what an MTP
        head reads: mtp.PromptDrafts).
        `media` (one rank): the prompt's images (embeddings and mRoPE positions of the whole prompt, indexed
        from token 0, so a state restored from a cached prefix continues with the right ones); the state then
        keeps the prompt's rope delta for decode.
        Returns (fp32 logits [V] of the last token, state).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        state = state if state is not None else self.new_state()
        self.check_tokens(token_ids, state.num_tokens)
        if self.runner.buckets is not None:  # compiled: no chunk longer than the largest graph
            chunk_size = min(chunk_size, self.runner.buckets.chunks[-1])
        ids = list(token_ids)
        start = state.num_tokens
        logits = None
        self._check_media(media, start + len(ids))
        for lo, hi in chunk_spans(start, start + len(ids), chunk_size, boundaries):
            if normed is None and media is None:
                logits = self.prefill_chunk(ids[lo - start: hi - start], state)
            elif self.group is not None and media is None:  # tensor-parallel: the leader gets the hidden states
                logits, hidden = self._prefill_chunk_normed(ids[lo - start: hi - start], state, False)
                normed.append(hidden)
            elif self.group is not None:  # images, tensor-parallel: every rank takes the chunk's embeddings
                logits = self._prefill_media_chunk(ids[lo - start: hi - start], state, media, lo, hi, normed)
            else:
                logits = self.runner.prefill_chunk(ids[lo - start: hi - start], state, normed=normed,
                                                   media=None if media is None else media.chunk(lo, hi, self.device))
            if media is not None:  # a snapshot taken here (on_chunk) carries the offset at its position
                state.rope_delta = media.delta_at(state.num_tokens)
            if on_chunk is not None:
                on_chunk(state)
        assert logits is not None
        return logits, state

    def _prefill_media_chunk(self, token_ids: list[int], state: HybridState, media: PromptMedia, lo: int,
                             hi: int, normed=None) -> torch.Tensor:
        """One image chunk on every rank of a tensor-parallel group: positions and rows as plain data, the
        embeddings broadcast from the leader (the tower runs there). `normed` as in `prefill` (the leader's)."""
        chunk = media.chunk(lo, hi, torch.device("cpu"))
        rows, values = chunk.embeds if chunk.embeds is not None else (torch.zeros(0, dtype=torch.long), None)
        self._outgoing_embeds = values
        logits, hidden = self._prefill_chunk_media(token_ids, state, chunk.rope.tolist(), rows.tolist(),
                                                   media.delta_at(hi), normed is not None)
        if normed is not None:
            normed.append(hidden)
        return logits

    @cross_rank("engine.prefill_chunk_normed")
    def _prefill_chunk_normed(self, token_ids: list[int], state: HybridState, all_logits: bool
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk into `state` through the eager graphs, on every rank: (its logits, as prefill_chunk's or all
        of them, and its final-normed hidden states [T, H], the same on every rank: what an MTP head reads)."""
        normed: list = []
        logits = self.eager.prefill_chunk(token_ids, state, all_logits=all_logits, normed=normed)
        return logits, normed[0]

    @cross_rank("engine.prefill_chunk_media")
    def _prefill_chunk_media(self, token_ids: list[int], state: HybridState, rope: list[list[int]],
                             rows: list[int], delta: int, with_normed: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from qwenpd.engine.runner import ChunkMedia

        embeds = None
        if rows:
            if self.group.leader:
                values, self._outgoing_embeds = self._outgoing_embeds.float().contiguous(), None
            else:
                values = torch.empty(len(rows), self.config.hidden_size, dtype=torch.float32)
            self.group.transfer(torch.distributed.broadcast, values, src=0, group=self.group.control)
            # fp32 on the wire: exact for the model dtype's values, whatever the transport supports
            embeds = (torch.tensor(rows, device=self.device), values.to(self.device, self.dtype))
        media = ChunkMedia(torch.tensor(rope, dtype=torch.long, device=self.device), embeds)
        normed: list | None = [] if with_normed else None
        logits = self.runner.prefill_chunk(token_ids, state, normed=normed, media=media)
        state.rope_delta = delta
        return logits, normed[0] if normed else None

    def _check_media(self, media: PromptMedia | None, num_tokens: int) -> None:
        if media is None:
            return
        if self.vision is None:
            raise ValueError("this model has no vision tower: it takes no images")
        if media.rope.shape[0] < num_tokens:
            raise ValueError(f"the prompt's media cover {media.rope.shape[0]} tokens, the prompt has {num_tokens}")

    def encode_images(self, pixels: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """The vision tower over images/videos (engine/media.py's patch rows and grids): one embedding tensor
        [tokens, H] per grid, in the model dtype on this engine's device."""
        if self.vision is None:
            raise ValueError("this model has no vision tower: it takes no images")
        return self.vision.encode(pixels, grids)

    @cross_rank("engine.prefill_chunk")
    def prefill_chunk(self, token_ids: list[int], state: HybridState) -> torch.Tensor:
        """One chunk (at most the largest compiled chunk) into `state`; logits [V] of its last token."""
        return self.runner.prefill_chunk(token_ids, state)

    def prefill_scored(self, token_ids: Sequence[int], top: int, state: HybridState | None = None,
                       on_chunk: Callable[[HybridState], None] | None = None, normed=None,
                       media: PromptMedia | None = None
                       ) -> tuple[torch.Tensor, HybridState, list[tuple[float, list[tuple[int, float]]]]]:
        """Prefill that also scores the prompt: for every token after the first, (its log-probability given the
        tokens before it, the `top` most likely ids at its position with theirs), under the model's unmodified
        distribution. Eager, in chunks of SCORE_CHUNK (every position's logits are computed, a chunk's at once).
        `normed` as in `prefill`. Returns (fp32 logits [V] of the last token, state, scores)."""
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        state = state if state is not None else self.new_state()
        self.check_tokens(token_ids, state.num_tokens)
        ids, start = list(token_ids), state.num_tokens
        self._check_media(media, start + len(ids))
        if media is not None and self.group is not None:
            raise ValueError("scoring a prompt with images is not served with tensor parallelism")
        scores: list[tuple[float, list[tuple[int, float]]]] = []
        before: torch.Tensor | None = None  # log-probabilities at the position before the chunk's first token
        last = None
        for lo, hi in chunk_spans(start, start + len(ids), SCORE_CHUNK):
            chunk = ids[lo - start: hi - start]
            if normed is None and media is None:
                logits = self.prefill_chunk_all(chunk, state)
            elif self.group is not None:  # tensor-parallel, no images (refused above): the leader gets the states
                logits, hidden = self._prefill_chunk_normed(chunk, state, True)
                normed.append(hidden)
            else:
                logits = self.eager.prefill_chunk(chunk, state, all_logits=True, normed=normed,
                                                  media=None if media is None else media.chunk(lo, hi, self.device))
            rows = torch.log_softmax(logits.float(), dim=-1)
            predicting = rows[:-1] if before is None else torch.cat([before[None], rows[:-1]])
            targets = chunk[1:] if before is None else chunk
            chosen = predicting.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
            tops = torch.topk(predicting, min(top, rows.shape[-1])) if top else None
            for k, lp in enumerate(chosen):
                cand = list(zip(tops.indices[k].tolist(), tops.values[k].tolist())) if tops is not None else []
                scores.append((lp, cand))
            before, last = rows[-1], logits[-1]
            if on_chunk is not None:
                on_chunk(state)
        if media is not None:
            state.rope_delta = media.delta_at(state.num_tokens)
        assert last is not None
        return last, state, scores

    @cross_rank("engine.prefill_chunk_all")
    def prefill_chunk_all(self, token_ids: list[int], state: HybridState) -> torch.Tensor:
        """One chunk into `state` through the eager graphs; logits [T, V] of all its tokens."""
        return self.eager.prefill_chunk(token_ids, state, all_logits=True)

    def forward_all(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] for every position of a fresh sequence (one chunk; for tests and scoring)."""
        self.check_tokens(token_ids)
        return self._forward_all(list(token_ids))

    @cross_rank("engine.forward_all")
    def _forward_all(self, token_ids: list[int]) -> torch.Tensor:
        return self.eager.prefill_chunk(token_ids, HybridState.empty(self.local_config, self.kv_cache),
                                        all_logits=True)

    @cross_rank("engine.measure_collectives")
    def measure_collectives(self, rows: int, iters: int = 20) -> float:
        """Seconds per decode step of `rows` sequences spent in the collectives alone (TPGroup.measure_collectives):
        the communication share of a sharded step. 0 when not sharded."""
        return 0.0 if self.group is None else self.group.measure_collectives(rows, iters, self.device)

    @cross_rank("engine.decode_batch", creates=True)
    def decode_batch(self, max_batch: int) -> "DecodeBatch":
        """A follower rank's copy of the leader's new DecodeBatch (the leader's constructor sends this call)."""
        return adopt(self, DecodeBatch(self, max_batch))

    def decode(self, states: list[HybridState], token_ids: Sequence[int]) -> torch.Tensor:
        """One step for a batch of independent states (stacks their DeltaNet state for this call only).

        Services keep sequences in a `DecodeBatch`, which avoids the stacking; this is the simple form.
        """
        batch = DecodeBatch(self, max_batch=len(states))
        for s in states:
            batch.add(s)
        logits = batch.step(token_ids)
        for s in list(states):
            batch.remove(s)
        return logits


def chunk_spans(start: int, end: int, chunk_size: int, boundaries: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Absolute [lo, hi) spans covering [start, end): at most chunk_size long, split at every boundary."""
    cuts = {b for b in boundaries if start < b < end}
    cuts.add(end)
    spans, lo = [], start
    for cut in sorted(cuts):
        while lo < cut:
            hi = min(lo + chunk_size, cut)
            spans.append((lo, hi))
            lo = hi
    return spans


class DecodeBatch:
    """Sequences decoding together. DeltaNet state lives stacked in slot tensors (the sequence's HybridState
    points at views of its slot while it is in the batch); active slots are kept dense in [0, size), so a step
    reads a slice with no gather. KV stays in each sequence's pages of the engine's paged cache."""

    def __init__(self, engine: Engine, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        c, dt, dev = engine.local_config, engine.dtype, engine.device
        self.engine = engine
        self.max_batch = max_batch
        n_lin = len(c.linear_layers)
        rows = engine.runner.decode_rows(max_batch)  # a step's padding rows are free slots too
        self.conv = [torch.zeros(rows, c.conv_dim, c.linear_conv_kernel_dim - 1, dtype=dt, device=dev)
                     for _ in range(n_lin)]
        self.recurrent = [torch.zeros(rows, c.linear_num_value_heads, c.linear_key_head_dim,
                                      c.linear_value_head_dim, dtype=torch.float32, device=dev) for _ in range(n_lin)]
        self.states: list[HybridState] = []
        self.verified: "Verified | None" = None  # the last verify pass, until its accept
        self.mirror = None
        mirror_new(engine, "engine.decode_batch", (max_batch,), self)  # the other ranks make their copy

    def __len__(self) -> int:
        return len(self.states)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.states)

    def _bind(self, state: HybridState, slot: int) -> None:
        for j in range(len(self.conv)):
            state.conv[j] = self.conv[j][slot]
            state.recurrent[j] = self.recurrent[j][slot]

    @cross_rank("batch.add")
    def add(self, state: HybridState) -> None:
        self.verified = None  # a pass not accepted (its step failed) is void once the slots change
        if not self.free_slots:
            raise RuntimeError("decode batch is full")
        if any(s is state for s in self.states):
            raise ValueError("state is already in the batch")
        slot = len(self.states)
        for j in range(len(self.conv)):
            self.conv[j][slot].copy_(state.conv[j])
            self.recurrent[j][slot].copy_(state.recurrent[j])
        self._bind(state, slot)
        self.states.append(state)

    @cross_rank("batch.remove")
    def remove(self, state: HybridState) -> None:
        """Detach `state` (it gets its own copy of its DeltaNet state back); the last slot fills the hole."""
        self.verified = None
        slot = next(i for i, s in enumerate(self.states) if s is state)
        for j in range(len(self.conv)):
            state.conv[j] = self.conv[j][slot].clone()
            state.recurrent[j] = self.recurrent[j][slot].clone()
        last = len(self.states) - 1
        if slot != last:
            moved = self.states[last]
            for j in range(len(self.conv)):
                self.conv[j][slot].copy_(self.conv[j][last])
                self.recurrent[j][slot].copy_(self.recurrent[j][last])
            self.states[slot] = moved
            self._bind(moved, slot)
        self.states.pop()

    @cross_rank("batch.verify")
    def verify(self, fed: list[list[int]], rollback: str = "auto") -> "Verified":
        """Speculative decoding's verify pass (engine/speculative.py `verify`): fed[i] (sequence i's last token,
        then its drafts) into self.states[i], every rank its shard; the pass is kept for `accept`."""
        from qwenpd.engine.speculative import verify

        self.verified = None
        self.verified = verify(self.engine, self, fed, rollback)
        return self.verified

    @cross_rank("batch.accept")
    def accept(self, consumed: list[int]) -> None:
        """Keep the first consumed[i] fed tokens of the last verify pass (speculative.py `accept`)."""
        from qwenpd.engine.speculative import accept

        if self.verified is None:
            raise RuntimeError("accept without a verify pass")
        done, self.verified = self.verified, None
        accept(self.engine, self, done, consumed)

    @cross_rank("batch.step")
    def step(self, token_ids: Sequence[int], normed: bool = False):
        """Feed token_ids[i] to self.states[i]; returns fp32 logits [B, V], with `normed` (logits, the final-normed
        hidden states [B, H]: what an MTP head reads)."""
        b = len(self.states)
        if len(token_ids) != b:
            raise ValueError(f"{len(token_ids)} tokens for a batch of {b}")
        if b == 0:
            raise ValueError("decode step on an empty batch")
        longest = max(s.num_tokens for s in self.states)
        limit = self.engine.config.max_position_embeddings
        if longest + 1 > limit:  # one check for the whole batch: only the longest sequence can overflow
            raise ValueError(f"context of {longest + 1} tokens exceeds the model's maximum {limit}")
        self.engine.check_tokens(token_ids)
        hidden: list | None = [] if normed else None
        logits = self.engine.runner.decode_step(list(token_ids), self.states, self.conv, self.recurrent, hidden)
        return (logits, hidden[0]) if normed else logits
