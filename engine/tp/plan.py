"""The tensor-parallel sharding plan: which slice of every weight and every state tensor one rank holds.

Megatron-style, by heads and channels, decided here and nowhere else:

    attention   q_proj (per head [q | gate] rows), k_proj/v_proj and the KV cache split by KV head; when the
                degree exceeds the KV heads, each KV head is replicated on degree/num_kv_heads ranks; o_proj
                split by input columns (row parallel: its outputs are summed across ranks)
    DeltaNet    key heads and value heads split together (value head j reads key head j // (Hv/Hk), so a
                contiguous block of value heads needs exactly the matching block of key heads): the q, k and
                v segments of in_proj_qkv and of the conv channels, in_proj_z/b/a, dt_bias, A_log and the
                recurrent state by head; out_proj row parallel
    MLP         gate_proj/up_proj split by rows (column parallel), down_proj by input columns (row parallel)
    lm_head     split by vocabulary rows (each rank scores its slice of the vocabulary)
    embeddings  split by vocabulary rows too (a rank looks up the ids in its slice, zeros elsewhere, and one
                all-reduce joins them); with tied embeddings the same slice is the rank's lm_head
    replicated  every norm weight

The checkpoint and every hand-off stay in the canonical full-tensor layout; a rank reads and writes only its
`state_ranges`, so a prefill at one degree hands off to a decode at any other. `local_config` is the model a
rank computes: the same layer code, with its share of the heads and channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from qwenpd.engine import state_spec
from qwenpd.engine.config import LINEAR, ModelConfig
from qwenpd.engine.state_spec import Split
from qwenpd.engine.tp.degree import ShardingError, check_degree

Range = tuple[int, int, int]  # (dim, start, stop) of a canonical tensor


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Rank `rank` of `degree` tensor-parallel ranks of model `config`."""

    config: ModelConfig
    degree: int
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.degree:
            raise ShardingError(f"rank {self.rank} of degree {self.degree}: need 0 <= rank < degree")
        check_degree(self.config, self.degree)

    # ---- what one rank computes -----------------------------------------------------------------------
    @property
    def local_config(self) -> ModelConfig:
        """The model this rank runs: its share of heads and channels (vocabulary and hidden size unchanged)."""
        c, n = self.config, self.degree
        return c.replace(num_attention_heads=c.num_attention_heads // n,
                         num_key_value_heads=max(1, c.num_key_value_heads // n),
                         linear_num_key_heads=max(1, c.linear_num_key_heads // n),
                         linear_num_value_heads=c.linear_num_value_heads // n,
                         intermediate_size=c.intermediate_size // n)

    def _heads(self, total: int) -> tuple[int, int]:
        """[start, stop) of the heads this rank holds out of `total` (a replica when degree > total)."""
        n = self.degree
        if n <= total:
            per = total // n
            return self.rank * per, (self.rank + 1) * per
        head = self.rank // (n // total)
        return head, head + 1

    @property
    def vocab_range(self) -> tuple[int, int]:
        per = self.config.vocab_size // self.degree
        return self.rank * per, (self.rank + 1) * per

    # ---- weights ----------------------------------------------------------------------------------------
    def weight_ranges(self, name: str) -> list[Range] | None:
        """The slices of canonical weight `name` (prefix-free, e.g. "layers.3.mlp.up_proj.weight") this rank
        holds, concatenated along their dim in order; None = the whole tensor (replicated)."""
        c = self.config
        if name in ("lm_head.weight", "embed_tokens.weight"):
            return [(0, *self.vocab_range)] if self.degree > 1 else None
        if not name.startswith("layers."):
            return None  # the final norm
        layer, field = name.split(".", 2)[1:]
        if field.startswith("mlp."):
            per = c.intermediate_size // self.degree
            span = (self.rank * per, (self.rank + 1) * per)
            return [(1, *span)] if field == "mlp.down_proj.weight" else [(0, *span)]
        if c.layer_types[int(layer)] == LINEAR:
            return self._deltanet_ranges(field.removeprefix("linear_attn."))
        return self._attention_ranges(field.removeprefix("self_attn."))

    def _attention_ranges(self, field: str) -> list[Range] | None:
        c, d = self.config, self.config.head_dim
        q0, q1 = self._heads(c.num_attention_heads)
        k0, k1 = self._heads(c.num_key_value_heads)
        return {"q_proj.weight": [(0, 2 * d * q0, 2 * d * q1)],  # per head [q | gate] rows
                "k_proj.weight": [(0, d * k0, d * k1)],
                "v_proj.weight": [(0, d * k0, d * k1)],
                "o_proj.weight": [(1, d * q0, d * q1)]}.get(field)  # q_norm, k_norm: replicated

    def _deltanet_ranges(self, field: str) -> list[Range] | None:
        c = self.config
        dv = c.linear_value_head_dim
        v0, v1 = self._heads(c.linear_num_value_heads)
        if field in ("in_proj_qkv.weight", "conv1d.weight"):
            return self._qkv_channels()
        return {"in_proj_z.weight": [(0, dv * v0, dv * v1)],
                "in_proj_b.weight": [(0, v0, v1)],
                "in_proj_a.weight": [(0, v0, v1)],
                "dt_bias": [(0, v0, v1)],
                "A_log": [(0, v0, v1)],
                "out_proj.weight": [(1, dv * v0, dv * v1)]}.get(field)  # norm.weight: replicated

    def _qkv_channels(self) -> list[Range]:
        """This rank's channels of the conv_dim axis, laid out [q (Hk·dk) | k (Hk·dk) | v (Hv·dv)]."""
        c = self.config
        dk, dv, kd = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_key_dim
        k0, k1 = self._key_heads_for_values()
        v0, v1 = self._heads(c.linear_num_value_heads)
        return [(0, dk * k0, dk * k1), (0, kd + dk * k0, kd + dk * k1), (0, 2 * kd + dv * v0, 2 * kd + dv * v1)]

    def _key_heads_for_values(self) -> tuple[int, int]:
        c = self.config
        v0, v1 = self._heads(c.linear_num_value_heads)
        group = c.linear_num_value_heads // c.linear_num_key_heads
        return v0 // group, (v1 - 1) // group + 1

    def shard_weights(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's (contiguous) copies of the canonical `weights`."""
        return {name: take(t, self.weight_ranges(name)) for name, t in weights.items()}

    # ---- state (KV, conv, recurrent) in the canonical checkpoint layout ---------------------------------
    def state_ranges(self, name: str) -> list[Range]:
        """The slices of canonical state tensor `name` ("layers.3.k", "layers.0.conv", "layers.0.recurrent")
        this rank holds, concatenated along dim 0 in order (state_spec.py says how each kind splits)."""
        c, split = self.config, state_spec.kind_of(name).split
        if split is Split.KV_HEADS:  # [Hkv, T, D]
            return [(0, *self._heads(c.num_key_value_heads))]
        if split is Split.QKV_CHANNELS:  # [conv_dim, W-1]
            return self._qkv_channels()
        if split is Split.VALUE_HEADS:  # [Hv, dk, dv]
            return [(0, *self._heads(c.linear_num_value_heads))]
        raise ShardingError(f"no sharding rule for state tensor {name!r}")

    def write_ranges(self, name: str) -> list[tuple[Range, int]]:
        """What this rank writes of `name` into a shared (canonical) checkpoint: (range, offset of that range in
        its local tensor) for each of its `state_ranges` it owns. Of the replicas of a KV head (degree above
        num_key_value_heads) or of a DeltaNet key head's q/k channels, only the first rank writes."""
        c, split = self.config, state_spec.kind_of(name).split
        out, offset = [], 0
        for i, (dim, start, stop) in enumerate(self.state_ranges(name)):
            replicated = (split is Split.KV_HEADS and not self._first_replica(c.num_key_value_heads)) or \
                (split is Split.QKV_CHANNELS and i < 2 and not self._first_replica(c.linear_num_key_heads))
            if not replicated:
                out.append(((dim, start, stop), offset))
            offset += stop - start
        return out

    def _first_replica(self, heads: int) -> bool:
        return self.degree <= heads or self.rank % (self.degree // heads) == 0

    def shard_state(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: take(t, self.state_ranges(name)) for name, t in tensors.items()}


def plans(config: ModelConfig, degree: int) -> list[ShardPlan]:
    return [ShardPlan(config, degree, rank) for rank in range(degree)]


def take(t: torch.Tensor, ranges: list[Range] | None) -> torch.Tensor:
    """The slices `ranges` of `t`, concatenated along their (common) dim; the whole tensor for None."""
    if ranges is None:
        return t.contiguous()
    dim = ranges[0][0]
    return torch.cat([t.narrow(dim, start, stop - start) for _, start, stop in ranges], dim=dim).contiguous()


def merge_state(shards: list[Mapping[str, torch.Tensor]], shard_plans: list[ShardPlan],
                like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reassemble canonical state tensors (shapes and dtypes of `like`) from every rank's slices, each rank
    writing only its `write_ranges`: what a shared checkpoint receives from a tensor-parallel group."""
    out = {name: torch.empty_like(t) for name, t in like.items()}
    for shard, plan in zip(shards, shard_plans, strict=True):
        for name, piece in shard.items():
            for (dim, start, stop), offset in plan.write_ranges(name):
                out[name].narrow(dim, start, stop - start).copy_(piece.narrow(dim, offset, stop - start))
    return out
