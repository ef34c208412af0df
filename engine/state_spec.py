"""The state that moves: what one sequence's model state is, tensor by tensor, in the canonical layout that every
hand-off checkpoint, prefix-cache entry and tensor-parallel exchange uses. This module is its one owner: names,
shapes, dtypes, which axis tensor parallelism splits, and the check of a set of tensors against it.

Per sequence, named by absolute layer index i:

    layers.{i}.k, layers.{i}.v   GQA layer:      [Hkv, T, D]              model dtype  TP: dim 0 by KV head
    layers.{i}.conv              DeltaNet layer: [conv_dim, W-1]          model dtype  TP: dim 0 by q|k|v channel
    layers.{i}.recurrent         DeltaNet layer: [Hv, dk, dv]             float32      TP: dim 0 by value head

T is the number of tokens the KV covers (a block, a tail, or the whole prefix); the DeltaNet tensors do not
depend on it.

The draft state: what speculative decoding's MTP head (engine/mtp.py) needs to draft from the next step, carried
by a hand-off checkpoint next to the model state when prefill ran the head (optional: `handoff_shapes`):

    mtp.{l}.k, mtp.{l}.v         MTP layer l:    [Hkv, T-1, D]            model dtype  (positions 0 .. T-2)
    mtp.hidden                                   [H]                      model dtype  (the main model's final-normed
                                                                                        hidden state at T-1)

Position t of the head pairs the hidden state at t with token t+1, so after T tokens its KV covers T-1 positions;
the last pair is completed by the first token decode feeds.

The rotary offset: after a prompt with images, a token's rotary position is its index plus a (negative) delta
(engine/mrope.py). A state with a nonzero delta carries it (optional, for models with a vision tower), in every
piece that ends at a position: the hand-off, a prefix-cache snapshot, a decode-side resume point:

    rope.delta                                   [1]                      int64

Adding a kind (a draft layer's KV, a rotary position offset) is one entry in KINDS; everything
else (the engine's state I/O, the decode service's checks, the sharding plan, the benchmarks) asks here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from qwenpd.engine.config import FULL, LINEAR, ModelConfig

RECURRENT_DTYPE = torch.float32  # the DeltaNet recurrent state is kept in fp32 on every device, whatever the model


class Split(enum.Enum):
    """How tensor parallelism splits a state tensor's dim 0 (the plan turns it into row ranges per rank)."""

    KV_HEADS = "kv_heads"  # [Hkv, ...]: by KV head (replicated when the degree exceeds the heads)
    QKV_CHANNELS = "qkv_channels"  # [conv_dim, ...] laid out [q (Hk·dk) | k (Hk·dk) | v (Hv·dv)]: by head, per segment
    VALUE_HEADS = "value_heads"  # [Hv, ...]: by DeltaNet value head


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of state tensor: which layers have it, its shape, its dtype, how TP splits it."""

    name: str  # the name's last part: layers.{i}.<name>
    layer_type: str  # FULL or LINEAR
    shape: Callable[[ModelConfig, int], tuple[int, ...]]  # (config, num_tokens) -> shape
    split: Split
    fp32: bool = False  # always float32 (else the model dtype)
    per_token: bool = False  # grows with the tokens it covers (KV): blocks are joined along dim 1

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return RECURRENT_DTYPE if self.fp32 else model_dtype


def _kv_shape(c: ModelConfig, tokens: int) -> tuple[int, ...]:
    return (c.num_key_value_heads, tokens, c.head_dim)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("k", FULL, _kv_shape, Split.KV_HEADS, per_token=True),
    Kind("v", FULL, _kv_shape, Split.KV_HEADS, per_token=True),
    Kind("conv", LINEAR, lambda c, _: (c.conv_dim, c.linear_conv_kernel_dim - 1), Split.QKV_CHANNELS),
    Kind("recurrent", LINEAR, lambda c, _: (c.linear_num_value_heads, c.linear_key_head_dim,
                                            c.linear_value_head_dim), Split.VALUE_HEADS, fp32=True),
)}
KV_KINDS = tuple(k.name for k in KINDS.values() if k.per_token)
DELTANET_KINDS = tuple(k.name for k in KINDS.values() if not k.per_token)


DRAFT_HIDDEN = "mtp.hidden"


def draft_shapes(config: ModelConfig, num_tokens: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the draft state after `num_tokens` tokens (none without an MTP head)."""
    if not config.mtp_num_hidden_layers:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(config.mtp_num_hidden_layers):
        for kind in ("k", "v"):
            out[f"mtp.{layer}.{kind}"] = (config.num_key_value_heads, max(0, num_tokens - 1), config.head_dim)
    out[DRAFT_HIDDEN] = (config.hidden_size,)
    return out


ROPE_DELTA = "rope.delta"
ROPE_DELTA_DTYPE = torch.int64


def rope_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the rotary offset a state may carry (models with a vision tower only)."""
    return {ROPE_DELTA: (1,)} if config.vision is not None else {}


class Expected(dict):
    """Name -> shape (or dtype) a checkpoint's tensors must match, where each of the `optional` groups may be
    absent (all of a group or none of it: the cache store's readers check the set)."""

    def __init__(self, required: Mapping, *optional: Mapping):
        merged = dict(required)
        for group in optional:
            merged.update(group)
        super().__init__(merged)
        self.groups = tuple(frozenset(g) for g in optional if g)

    def absent_allowed(self, missing: set[str]) -> bool:
        """Whether exactly these names may be missing: whole optional groups, nothing else."""
        rest = set(missing)
        for group in self.groups:
            if group <= rest:
                rest -= group
        return not rest


def handoff_shapes(config: ModelConfig, num_tokens: int) -> Expected:
    """What a hand-off checkpoint after `num_tokens` tokens holds: the state, maybe the draft state, maybe the
    rotary offset."""
    return Expected(shapes(config, num_tokens), draft_shapes(config, num_tokens), rope_shapes(config))


def handoff_dtypes(config: ModelConfig, model_dtype: torch.dtype) -> Expected:
    return Expected(dtypes(config, model_dtype), {name: model_dtype for name in draft_shapes(config, 1)},
                    {name: ROPE_DELTA_DTYPE for name in rope_shapes(config)})


def rope_delta_of(tensors: Mapping[str, torch.Tensor]) -> int:
    """The rotary offset a set of state tensors carries (0 if none)."""
    t = tensors.get(ROPE_DELTA)
    return 0 if t is None else int(t.reshape(-1)[0])


def rope_tensors(delta: int) -> dict[str, torch.Tensor]:
    """The tensor that carries a nonzero rotary offset ({} for 0: text-only states carry nothing)."""
    return {ROPE_DELTA: torch.tensor([delta], dtype=ROPE_DELTA_DTYPE)} if delta else {}


def split_draft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the draft state's tensors out of a checkpoint's `tensors` (in place); returns them ({} if none)."""
    return {name: tensors.pop(name) for name in [n for n in tensors if n.startswith("mtp.")]}


class StateMismatch(ValueError):
    """Tensors that are not the state of this model (names, shapes or dtypes)."""


def tensor_name(layer: int, kind: str) -> str:
    return f"layers.{layer}.{kind}"


def kind_of(name: str) -> Kind:
    """The Kind of state tensor `name` ("layers.3.k" -> k); StateMismatch for a name that is none."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in KINDS:
        raise StateMismatch(f"{name!r} is not a state tensor name (layers.<i>.<{'|'.join(KINDS)}>)")
    return KINDS[parts[2]]


def layers_of(config: ModelConfig, kind: str) -> tuple[int, ...]:
    """The absolute indices of the layers that carry `kind`, in order."""
    return config.linear_layers if KINDS[kind].layer_type == LINEAR else config.attention_layers


def names(config: ModelConfig, kinds: tuple[str, ...] = tuple(KINDS)) -> Iterator[tuple[str, int, int, str]]:
    """(name, layer, index among the layers of its type, kind) of every state tensor of `config` of `kinds`."""
    for kind in kinds:
        for j, layer in enumerate(layers_of(config, kind)):
            yield tensor_name(layer, kind), layer, j, kind


def shapes(config: ModelConfig, num_tokens: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every state tensor after `num_tokens` tokens."""
    return {name: KINDS[kind].shape(config, num_tokens) for name, _, _, kind in names(config)}


def dtypes(config: ModelConfig, model_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Name -> dtype of every state tensor."""
    return {name: KINDS[kind].dtype(model_dtype) for name, _, _, kind in names(config)}


def dtype_of(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return kind_of(name).dtype(model_dtype)


def canonical_shape(config: ModelConfig, name: str, local: tuple[int, ...]) -> tuple[int, ...]:
    """The full shape of state tensor `name` given one tensor-parallel rank's slice of it (TP splits dim 0)."""
    return (kind_of(name).shape(config, 0)[0], *tuple(local)[1:])


def nbytes(config: ModelConfig, num_tokens: int, model_dtype_bytes: int = 2) -> int:
    """Bytes of one sequence's state after `num_tokens` tokens (model dtype of `model_dtype_bytes` bytes)."""
    return sum(math.prod(KINDS[kind].shape(config, num_tokens)) *
               (RECURRENT_DTYPE.itemsize if KINDS[kind].fp32 else model_dtype_bytes) for _, _, _, kind in names(config))


def check_tensors(config: ModelConfig, tensors: Mapping[str, torch.Tensor], num_tokens: int,
                  model_dtype: torch.dtype) -> None:
    """StateMismatch (a ValueError) unless `tensors` are exactly the state tensors of `config` after
    `num_tokens` tokens, with the contract's shapes and dtypes."""
    expected = shapes(config, num_tokens)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - set(rope_shapes(config)))
    if missing or extra:
        raise StateMismatch(f"state tensors do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    if ROPE_DELTA in tensors and (tuple(tensors[ROPE_DELTA].shape) != (1,)
                                  or tensors[ROPE_DELTA].dtype != ROPE_DELTA_DTYPE):
        raise StateMismatch(f"{ROPE_DELTA} must be one int64, got {tuple(tensors[ROPE_DELTA].shape)} "
                            f"{tensors[ROPE_DELTA].dtype}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise StateMismatch(f"state tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        want = dtype_of(name, model_dtype)
        if t.dtype != want:
            raise StateMismatch(f"state tensor {name} has dtype {t.dtype}, expected {want}")


def join_blocks(config: ModelConfig, kv_blocks: list[Mapping[str, torch.Tensor]],
                snapshot: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state tensors of a cached prefix: its KV blocks joined along tokens, plus the DeltaNet snapshot."""
    tensors = dict(snapshot)
    for name, _, _, _ in names(config, KV_KINDS):
        try:
            tensors[name] = torch.cat([b[name] for b in kv_blocks], dim=1)
        except (KeyError, RuntimeError) as exc:
            raise StateMismatch(f"cached KV blocks do not fit the model at {name}: {exc}") from None
    return tensors
