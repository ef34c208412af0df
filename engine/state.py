"""Per-sequence hybrid model state: GQA KV (pages of the engine's paged cache) for attention layers, conv +
recurrent state for DeltaNet layers. At the boundary it is the canonical set of tensors engine/state_spec.py
defines (full contiguous K/V per layer), converted here (to_tensors / from_tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qwenpd.engine import state_spec
from qwenpd.engine.config import ModelConfig
from qwenpd.engine.kv_cache import PagedKVCache, SequenceKV
from qwenpd.engine.tp import state_io
from qwenpd.engine.tp.calls import cross_rank


@dataclass(frozen=True, slots=True)
class Piece:
    """Which of a state's tensors to take: KV of tokens [lo, hi) ("kv"), the DeltaNet state ("deltanet"), or
    both with KV from `lo` to the end ("handoff")."""

    what: Literal["kv", "deltanet", "handoff"]
    lo: int = 0
    hi: int = 0


@dataclass(slots=True, weakref_slot=True)
class HybridState:
    """Everything a sequence needs to continue: the state after consuming `num_tokens` tokens.

    kv:           the sequence's pages in the engine's PagedKVCache (all attention layers share the block table).
    conv:         per DeltaNet layer [conv_dim, W-1], the last W-1 projected inputs (oldest first). Model dtype.
    recurrent:    per DeltaNet layer [Hv, dk, dv], float32 always.
    rope_delta:   what the next token's rotary position adds to its index (nonzero after a prompt with images).
    Layer lists follow config.attention_layers / config.linear_layers order.

    Under tensor parallelism `config` is the rank's local config and the tensors hold its heads and channels;
    the state lives on every rank (`mirror`, engine/tp/calls.py), and the methods that return host tensors
    return the canonical full tensors on the leader (None on the other ranks).
    """

    config: ModelConfig
    num_tokens: int
    kv: SequenceKV
    conv: list[torch.Tensor]
    recurrent: list[torch.Tensor]
    token_ids: list[int] = field(default_factory=list)
    mirror: Any = None  # its place on every rank of a tensor-parallel group (None: not sharded)
    # what a token's rotary position adds to its index after a prompt with images (engine/mrope.py); 0 for text
    rope_delta: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, kv_cache: PagedKVCache) -> "HybridState":
        c, dtype, device = config, kv_cache.dtype, kv_cache.device
        return cls(
            config=c,
            num_tokens=0,
            kv=kv_cache.sequence(),
            conv=[torch.zeros(c.conv_dim, c.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
                  for _ in range(len(c.linear_layers))],
            recurrent=[torch.zeros(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                                   dtype=torch.float32, device=device) for _ in range(len(c.linear_layers))],
        )

    @property
    def device(self) -> torch.device:
        return self.kv.cache.device

    @cross_rank("state.reserve")
    def reserve(self, num_tokens: int) -> None:
        """Own KV pages for `num_tokens` tokens in total (OutOfPages if the cache cannot give them)."""
        self.kv.reserve(num_tokens)

    @cross_rank("state.release")
    def release(self) -> None:
        """Give the KV pages back now (also happens when the state is garbage collected)."""
        self.kv.release()

    def kv_of(self, attn_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Live K, V of attention layer number `attn_index` (copies): [Hkv, num_tokens, D] each."""
        return self.kv.read(attn_index, 0, self.num_tokens)

    # ---- (de)serialisation: flat name -> tensor, used by checkpoints --------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous host tensors named by absolute layer index ("layers.3.k", "layers.0.recurrent", ...)."""
        return self.handoff_tensors(0)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], num_tokens: int,
                     kv_cache: PagedKVCache, extra_tokens: int = 0, views: bool = False) -> "HybridState":
        """Inverse of to_tensors: KV copied page by page into the cache (pages for num_tokens + extra_tokens),
        DeltaNet state into fresh tensors on the cache's device, or with `views` kept as the given tensors (a
        decode batch copies them into its slot: their one copy). Raises ValueError on a mismatch with the model."""
        state_spec.check_tensors(config, tensors, num_tokens, kv_cache.dtype)
        if views:
            deltanet = {kind: [tensors[name] for name, _, _, _ in state_spec.names(config, (kind,))]
                        for kind in state_spec.DELTANET_KINDS}
            state = cls(config, num_tokens, kv_cache.sequence(), deltanet["conv"], deltanet["recurrent"])
        else:
            state = cls.empty(config, kv_cache)
            state.num_tokens = num_tokens
            for name, _, j, kind in state_spec.names(config, state_spec.DELTANET_KINDS):
                (state.conv if kind == "conv" else state.recurrent)[j].copy_(tensors[name])
        state.rope_delta = state_spec.rope_delta_of(tensors)
        state.reserve(num_tokens + extra_tokens)
        state.load_kv(tensors)
        return state

    def load_kv(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the full K/V of every attention layer (canonical tensors) into this state's pages."""
        for j, layer in enumerate(self.config.attention_layers):
            self.kv.load(j, tensors[state_spec.tensor_name(layer, "k")], tensors[state_spec.tensor_name(layer, "v")])

    # ---- pieces for the prefix cache -------------------------------------------------------------------
    def kv_tensors(self, lo: int, hi: int, for_write: bool = False) -> dict[str, torch.Tensor]:
        """K/V of tokens [lo, hi) of every attention layer (contiguous host copies): one KV block or the tail.

        Sharded, the leader gets the canonical tensors (gathered from every rank; None on the others); with
        `for_write`, stand-ins instead, whose slices each rank keeps and writes itself into the shared-memory
        checkpoint they go to (engine/tp/state_io.py StagedState; other buffers gather them then)."""
        if not 0 <= lo <= hi <= self.num_tokens:
            raise ValueError(f"token range [{lo}, {hi}) outside the {self.num_tokens} consumed")
        return self._export(Piece("kv", lo, hi), for_write)

    def deltanet_tensors(self, for_write: bool = False) -> dict[str, torch.Tensor]:
        """Conv and recurrent state of every DeltaNet layer (copies): a snapshot at the current position.
        Sharded: as kv_tensors."""
        return self._export(Piece("deltanet"), for_write)

    def handoff_tensors(self, lo: int, for_write: bool = False) -> dict[str, torch.Tensor]:
        """K/V of tokens [lo, num_tokens) and the DeltaNet state: a checkpoint's own tensors (KV before `lo`
        lives in shared prefix blocks). Sharded: as kv_tensors, in one exchange."""
        if not 0 <= lo <= self.num_tokens:
            raise ValueError(f"token {lo} outside the {self.num_tokens} consumed")
        return self._export(Piece("handoff", lo, self.num_tokens), for_write)

    def local_tensors(self, piece: Piece) -> dict[str, torch.Tensor]:
        """`piece` of this rank's state as contiguous host copies (all of it when not sharded)."""
        out: dict[str, torch.Tensor] = {}
        if piece.what in ("kv", "handoff"):
            for j, layer in enumerate(self.config.attention_layers):
                k, v = self.kv.read(j, piece.lo, piece.hi)
                out[state_spec.tensor_name(layer, "k")] = _host(k)
                out[state_spec.tensor_name(layer, "v")] = _host(v)
        if piece.what in ("deltanet", "handoff"):
            for name, _, j, kind in state_spec.names(self.config, state_spec.DELTANET_KINDS):
                out[name] = _host((self.conv if kind == "conv" else self.recurrent)[j], copy=True)
            if self.mirror is None:  # sharded: added once, on the leader (_export)
                out.update(state_spec.rope_tensors(self.rope_delta))  # after a prompt with images
        return out

    def _export(self, piece: Piece, for_write: bool) -> dict[str, Any] | None:
        if self.mirror is None:
            return self.local_tensors(piece)
        out = state_io.export(self, piece, for_write)
        if out is not None and piece.what in ("deltanet", "handoff"):
            out.update(state_spec.rope_tensors(self.rope_delta))  # the same number on every rank
        return out

    @classmethod
    def from_prefix(cls, config: ModelConfig, kv_blocks: list[dict[str, torch.Tensor]],
                    snapshot: dict[str, torch.Tensor], num_tokens: int, kv_cache: PagedKVCache,
                    extra_tokens: int = 0) -> "HybridState":
        """A state restored from cached KV blocks (in prefix order) and the DeltaNet snapshot after the last
        of them. Raises ValueError on a mismatch with the model."""
        return cls.from_tensors(config, state_spec.join_blocks(config, kv_blocks, snapshot), num_tokens, kv_cache,
                                extra_tokens)

    def nbytes(self) -> int:
        return self.config.state_bytes(self.num_tokens, self.kv.cache.k[0].element_size() if self.kv.cache.k else 2)


def _host(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """A contiguous host copy for the checkpoint boundary (the cache store writes host memory); meta stays meta."""
    if t.device.type in ("cpu", "meta"):
        return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()
    return t.to("cpu", memory_format=torch.contiguous_format)
