"""Per-sequence hybrid model state: GQA KV (pages of the engine's paged cache) for attention layers, conv +
recurrent state for DeltaNet layers. The checkpoint format at the boundary is unchanged: full contiguous K/V
tensors per layer, converted here (to_tensors / from_tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.kv_cache import PagedKVCache, SequenceKV
from qwenpd.engine.parallel import StagedState, mirrored


@dataclass(slots=True, weakref_slot=True)
class HybridState:
    """Everything a sequence needs to continue: the state after consuming `num_tokens` tokens.

    kv:           the sequence's pages in the engine's PagedKVCache (all attention layers share the block table).
    conv:         per DeltaNet layer [conv_dim, W-1], the last W-1 projected inputs (oldest first). Model dtype.
    recurrent:    per DeltaNet layer [Hv, dk, dv], float32 always.
    Layer lists follow config.attention_layers / config.linear_layers order.

    Under tensor parallelism `config` is the rank's local config and the tensors hold its heads and channels;
    the leader's state is mirrored on every rank (`group`, `handle`: engine/parallel.py), and the methods that
    return host tensors return the canonical full tensors on the leader (None on the other ranks).
    """

    config: ModelConfig
    num_tokens: int
    kv: SequenceKV
    conv: list[torch.Tensor]
    recurrent: list[torch.Tensor]
    token_ids: list[int] = field(default_factory=list)
    group: Any = None  # the TPGroup this state is mirrored in (None: not sharded)
    handle: int = 0

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

    @mirrored()
    def reserve(self, num_tokens: int) -> None:
        """Own KV pages for `num_tokens` tokens in total (OutOfPages if the cache cannot give them)."""
        self.kv.reserve(num_tokens)

    @mirrored()
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
                     kv_cache: PagedKVCache, extra_tokens: int = 0) -> "HybridState":
        """Inverse of to_tensors: KV copied page by page into the cache (pages for num_tokens + extra_tokens),
        DeltaNet state into fresh tensors on the cache's device. Raises ValueError on a mismatch with the model."""
        check_tensors(config, tensors, num_tokens, kv_cache.dtype)
        state = cls.empty(config, kv_cache)
        state.num_tokens = num_tokens
        state.reserve(num_tokens + extra_tokens)
        for j, layer in enumerate(config.attention_layers):
            state.kv.load(j, tensors[f"layers.{layer}.k"], tensors[f"layers.{layer}.v"])
        for j, layer in enumerate(config.linear_layers):
            state.conv[j].copy_(tensors[f"layers.{layer}.conv"])
            state.recurrent[j].copy_(tensors[f"layers.{layer}.recurrent"])
        return state

    # ---- pieces for the prefix cache -------------------------------------------------------------------
    def kv_tensors(self, lo: int, hi: int, for_write: bool = False) -> dict[str, torch.Tensor]:
        """K/V of tokens [lo, hi) of every attention layer (contiguous host copies): one KV block or the tail.

        Sharded, the leader gets the canonical tensors (gathered from every rank; None on the others); with
        `for_write`, stand-ins instead, whose slices each rank keeps and writes itself into the shared-memory
        checkpoint they go to (engine/parallel.py StagedState; other buffers gather them then)."""
        if not 0 <= lo <= hi <= self.num_tokens:
            raise ValueError(f"token range [{lo}, {hi}) outside the {self.num_tokens} consumed")
        return self._across_ranks("_kv_local", (lo, hi), for_write)

    def deltanet_tensors(self, for_write: bool = False) -> dict[str, torch.Tensor]:
        """Conv and recurrent state of every DeltaNet layer (copies): a snapshot at the current position.
        Sharded: as kv_tensors."""
        return self._across_ranks("_deltanet_local", (), for_write)

    def handoff_tensors(self, lo: int, for_write: bool = False) -> dict[str, torch.Tensor]:
        """K/V of tokens [lo, num_tokens) and the DeltaNet state: a checkpoint's own tensors (KV before `lo`
        lives in shared prefix blocks). Sharded: as kv_tensors, in one exchange."""
        if not 0 <= lo <= self.num_tokens:
            raise ValueError(f"token {lo} outside the {self.num_tokens} consumed")
        return self._across_ranks("_handoff_local", (lo,), for_write)

    def _handoff_local(self, lo: int) -> dict[str, torch.Tensor]:
        return {**self._kv_local(lo, self.num_tokens), **self._deltanet_local()}

    def _kv_local(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for j, layer in enumerate(self.config.attention_layers):
            k, v = self.kv.read(j, lo, hi)
            out[f"layers.{layer}.k"] = _host(k)
            out[f"layers.{layer}.v"] = _host(v)
        return out

    def _deltanet_local(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for j, layer in enumerate(self.config.linear_layers):
            out[f"layers.{layer}.conv"] = _host(self.conv[j], copy=True)
            out[f"layers.{layer}.recurrent"] = _host(self.recurrent[j], copy=True)
        return out

    def _across_ranks(self, local: str, args: tuple, for_write: bool) -> dict[str, Any] | None:
        if self.group is None:
            return getattr(self, local)(*args)
        return self._stage(local, args) if for_write else self._gather(local, args)

    @mirrored()
    def _gather(self, local: str, args: tuple) -> dict[str, torch.Tensor] | None:
        return self.group.gather_state(getattr(self, local)(*args))

    @mirrored(creates=True)
    def _stage(self, local: str, args: tuple) -> dict[str, Any] | None:
        staged = self.group.adopt(StagedState(self.group, getattr(self, local)(*args)))
        return staged.tensors() if self.group.leader else None

    @classmethod
    def from_prefix(cls, config: ModelConfig, kv_blocks: list[dict[str, torch.Tensor]],
                    snapshot: dict[str, torch.Tensor], num_tokens: int, kv_cache: PagedKVCache,
                    extra_tokens: int = 0) -> "HybridState":
        """A state restored from cached KV blocks (in prefix order) and the DeltaNet snapshot after the last
        of them. Raises ValueError on a mismatch with the model."""
        return cls.from_tensors(config, prefix_tensors(config, kv_blocks, snapshot), num_tokens, kv_cache,
                                extra_tokens)

    def nbytes(self) -> int:
        return self.config.state_bytes(self.num_tokens, self.kv.cache.k[0].element_size() if self.kv.cache.k else 2)


def prefix_tensors(config: ModelConfig, kv_blocks: list[dict[str, torch.Tensor]],
                   snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state tensors of a cached prefix: its KV blocks joined along tokens, plus the DeltaNet snapshot."""
    tensors = dict(snapshot)
    for layer in config.attention_layers:
        for kind in ("k", "v"):
            name = f"layers.{layer}.{kind}"
            try:
                tensors[name] = torch.cat([b[name] for b in kv_blocks], dim=1)
            except (KeyError, RuntimeError) as exc:
                raise ValueError(f"cached KV blocks do not fit the model at {name}: {exc}") from None
    return tensors


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], num_tokens: int, dtype: torch.dtype) -> None:
    """ValueError unless `tensors` are exactly the state tensors of `config` after num_tokens tokens."""
    expected = expected_shapes(config, num_tokens)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"state tensors do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"state tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        want = torch.float32 if name.endswith(".recurrent") else dtype
        if t.dtype != want:
            raise ValueError(f"state tensor {name} has dtype {t.dtype}, expected {want}")


def _host(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """A contiguous host copy for the checkpoint boundary (the cache store writes host memory); meta stays meta."""
    if t.device.type in ("cpu", "meta"):
        return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()
    return t.to("cpu", memory_format=torch.contiguous_format)


def expected_shapes(config: ModelConfig, num_tokens: int) -> dict[str, tuple[int, ...]]:
    c = config
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in c.attention_layers:
        shapes[f"layers.{layer}.k"] = (c.num_key_value_heads, num_tokens, c.head_dim)
        shapes[f"layers.{layer}.v"] = (c.num_key_value_heads, num_tokens, c.head_dim)
    for layer in c.linear_layers:
        shapes[f"layers.{layer}.conv"] = (c.conv_dim, c.linear_conv_kernel_dim - 1)
        shapes[f"layers.{layer}.recurrent"] = (c.linear_num_value_heads, c.linear_key_head_dim,
                                               c.linear_value_head_dim)
    return shapes
