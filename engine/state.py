"""Per-sequence hybrid model state: GQA KV for attention layers, conv + recurrent state for DeltaNet layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenpd.engine.config import ModelConfig

_MIN_CAPACITY = 64


@dataclass(slots=True)
class HybridState:
    """Everything a sequence needs to continue: the state after consuming `num_tokens` tokens.

    keys/values:  per attention layer, a capacity-backed buffer [Hkv, capacity, D]; the live part is
                  [:, :num_tokens]. Model dtype.
    conv:         per DeltaNet layer [conv_dim, W-1], the last W-1 projected inputs (oldest first). Model dtype.
    recurrent:    per DeltaNet layer [Hv, dk, dv], float32 always.
    Layer lists follow config.attention_layers / config.linear_layers order.
    """

    config: ModelConfig
    num_tokens: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    conv: list[torch.Tensor]
    recurrent: list[torch.Tensor]
    token_ids: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
              capacity: int = _MIN_CAPACITY) -> "HybridState":
        c = config
        kv_shape = (c.num_key_value_heads, capacity, c.head_dim)
        n_attn, n_lin = len(c.attention_layers), len(c.linear_layers)
        return cls(
            config=c,
            num_tokens=0,
            keys=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_attn)],
            values=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_attn)],
            conv=[torch.zeros(c.conv_dim, c.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
                  for _ in range(n_lin)],
            recurrent=[torch.zeros(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                                   dtype=torch.float32, device=device) for _ in range(n_lin)],
        )

    # ---- KV buffer management ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 1 << 62

    def reserve(self, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (amortised doubling)."""
        if num_tokens <= self.capacity:
            return
        new_cap = max(num_tokens, 2 * self.capacity, _MIN_CAPACITY)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], new_cap, old.shape[2])
                new[:, : self.num_tokens] = old[:, : self.num_tokens]
                buffers[i] = new

    def kv(self, attn_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Live K, V of attention layer number `attn_index` (views): [Hkv, num_tokens, D] each."""
        n = self.num_tokens
        return self.keys[attn_index][:, :n], self.values[attn_index][:, :n]

    # ---- (de)serialisation: flat name -> tensor, used by checkpoints --------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous host tensors named by absolute layer index ("layers.3.k", "layers.0.recurrent", ...)."""
        out: dict[str, torch.Tensor] = {}
        for j, layer in enumerate(self.config.attention_layers):
            k, v = self.kv(j)
            out[f"layers.{layer}.k"] = _host(k)
            out[f"layers.{layer}.v"] = _host(v)
        for j, layer in enumerate(self.config.linear_layers):
            out[f"layers.{layer}.conv"] = _host(self.conv[j])
            out[f"layers.{layer}.recurrent"] = _host(self.recurrent[j])
        return out

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], num_tokens: int,
                     dtype: torch.dtype, extra_capacity: int = _MIN_CAPACITY,
                     device: torch.device | str = "cpu") -> "HybridState":
        """Inverse of to_tensors; copies into fresh buffers on `device` with room to grow. Raises ValueError on
        mismatch."""
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
        state = cls.empty(config, dtype, device, capacity=max(_MIN_CAPACITY, num_tokens + extra_capacity))
        state.num_tokens = num_tokens
        for j, layer in enumerate(config.attention_layers):
            state.keys[j][:, :num_tokens] = tensors[f"layers.{layer}.k"]
            state.values[j][:, :num_tokens] = tensors[f"layers.{layer}.v"]
        for j, layer in enumerate(config.linear_layers):
            state.conv[j].copy_(tensors[f"layers.{layer}.conv"])
            state.recurrent[j].copy_(tensors[f"layers.{layer}.recurrent"])
        return state

    # ---- pieces for the prefix cache -------------------------------------------------------------------
    def kv_tensors(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """K/V of tokens [lo, hi) of every attention layer (contiguous copies): one KV block or the tail."""
        if not 0 <= lo <= hi <= self.num_tokens:
            raise ValueError(f"token range [{lo}, {hi}) outside the {self.num_tokens} consumed")
        out: dict[str, torch.Tensor] = {}
        for j, layer in enumerate(self.config.attention_layers):
            out[f"layers.{layer}.k"] = _host(self.keys[j][:, lo:hi])
            out[f"layers.{layer}.v"] = _host(self.values[j][:, lo:hi])
        return out

    def deltanet_tensors(self) -> dict[str, torch.Tensor]:
        """Conv and recurrent state of every DeltaNet layer (copies): a snapshot at the current position."""
        out: dict[str, torch.Tensor] = {}
        for j, layer in enumerate(self.config.linear_layers):
            out[f"layers.{layer}.conv"] = _host(self.conv[j], copy=True)
            out[f"layers.{layer}.recurrent"] = _host(self.recurrent[j], copy=True)
        return out

    @classmethod
    def from_prefix(cls, config: ModelConfig, kv_blocks: list[dict[str, torch.Tensor]],
                    snapshot: dict[str, torch.Tensor], num_tokens: int, dtype: torch.dtype,
                    extra_capacity: int = 0, device: torch.device | str = "cpu") -> "HybridState":
        """A state restored from cached KV blocks (in prefix order) and the DeltaNet snapshot after the last
        of them, copied straight into fresh buffers. Raises ValueError on a mismatch with the model."""
        tensors = dict(snapshot)
        for j, layer in enumerate(config.attention_layers):
            for kind in ("k", "v"):
                name = f"layers.{layer}.{kind}"
                try:
                    tensors[name] = torch.cat([b[name] for b in kv_blocks], dim=1)
                except (KeyError, RuntimeError) as exc:
                    raise ValueError(f"cached KV blocks do not fit the model at {name}: {exc}") from None
        return cls.from_tensors(config, tensors, num_tokens, dtype, extra_capacity=max(extra_capacity, 64),
                                device=device)

    def clone(self) -> "HybridState":
        n = self.num_tokens
        cap = max(_MIN_CAPACITY, n + _MIN_CAPACITY)
        keys = [k.new_zeros(k.shape[0], cap, k.shape[2]) for k in self.keys]
        values = [torch.zeros_like(k) for k in keys]
        for dst, src in zip(keys + values, self.keys + self.values):
            dst[:, :n] = src[:, :n]
        return HybridState(self.config, n, keys, values, [c.clone() for c in self.conv],
                           [r.clone() for r in self.recurrent], list(self.token_ids))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())


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
