"""Model configuration: parsed from a checkpoint's config.json or taken from a named preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LINEAR = "linear_attention"
FULL = "full_attention"
SUPPORTED_MODEL_TYPES = ("qwen3_5_text", "qwen3_5")


class ConfigError(ValueError):
    """A config.json that qwenpd cannot serve (unsupported or inconsistent)."""


@dataclass(slots=True, frozen=True)
class VisionConfig:
    """The vision tower of a multimodal (`qwen3_5`) checkpoint (`vision_config`) and the special tokens that
    place its output in a prompt (engine/vision.py runs it; engine/mrope.py positions it)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10_000.0
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "in_channels", "num_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"vision_config.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} over {self.num_heads} heads must give "
                              "a head dim divisible by 4 (2-D rotary)")
        if int(self.num_position_embeddings ** 0.5) ** 2 != self.num_position_embeddings:
            raise ConfigError("vision_config.num_position_embeddings must be a square (a grid of positions)")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"unsupported vision hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal x patch x patch (a row of pixel_values)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf_dict(cls, v: dict[str, Any], top: dict[str, Any]) -> "VisionConfig":
        rope = dict(v.get("rope_parameters") or {})
        ids = {k: int(top[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id") if top.get(k) is not None}
        try:
            return cls(depth=int(v["depth"]), hidden_size=int(v["hidden_size"]),
                       intermediate_size=int(v["intermediate_size"]), num_heads=int(v["num_heads"]),
                       out_hidden_size=int(v["out_hidden_size"]), patch_size=int(v.get("patch_size", 16)),
                       temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                       spatial_merge_size=int(v.get("spatial_merge_size", 2)),
                       in_channels=int(v.get("in_channels", 3)),
                       num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
                       hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
                       rope_theta=float(rope.get("rope_theta", 10_000.0)), **ids)
        except KeyError as e:
            raise ConfigError(f"vision_config lacks required field {e.args[0]!r}") from e


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Shapes of a Qwen3.5/3.6 hybrid checkpoint: the text model, and the vision tower where the checkpoint has
    one (`vision`; the MTP head's depth too, which the main model ignores)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # "qwen3_5_text" (weights under `model.`) or "qwen3_5" (under `model.language_model.`)
    model_type: str = "qwen3_5_text"
    hidden_act: str = "silu"
    attention_bias: bool = False
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False
    # decoder layers of the multi-token-prediction head (`mtp.*` weights; 0: none); the main model ignores them
    mtp_num_hidden_layers: int = 0
    # the vision tower (multimodal `qwen3_5` checkpoints with a vision_config); None: text only
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r}; qwenpd serves {SUPPORTED_MODEL_TYPES}")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
                    "max_position_embeddings")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise ConfigError(f"unknown layer types {unknown}; expected {LINEAR!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                              f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; Qwen3.5 uses 'silu'")
        if self.attention_bias:
            raise ConfigError("attention_bias=True is not a Qwen3.5 layout")
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives rotary dim "
                              f"{self.rotary_dim} for head_dim={self.head_dim}; need an even number in 2..head_dim")
        if self.linear_conv_kernel_dim < 2:
            raise ConfigError("linear_conv_kernel_dim must be at least 2")
        if self.vision is not None and self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size {self.vision.out_hidden_size} != hidden_size "
                              f"{self.hidden_size}")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.num_attention_heads * self.head_dim * 2 + 2 * h * self.num_key_value_heads * self.head_dim
        attn += self.num_attention_heads * self.head_dim * h + 2 * self.head_dim
        lin = h * self.conv_dim + h * self.linear_value_dim + 2 * h * self.linear_num_value_heads
        lin += self.conv_dim * self.linear_conv_kernel_dim + 2 * self.linear_num_value_heads
        lin += self.linear_value_head_dim + self.linear_value_dim * h
        per_layer = 3 * h * i + 2 * h
        total = v * h * (1 if self.tie_word_embeddings else 2) + h
        for t in self.layer_types:
            total += per_layer + (lin if t == LINEAR else attn)
        return total

    def state_bytes(self, num_tokens: int, dtype_bytes: int = 2) -> int:
        """Bytes of the per-sequence hand-off state after `num_tokens` tokens (engine/state_spec.py)."""
        from qwenpd.engine import state_spec  # the state's contract (it imports this module)

        return state_spec.nbytes(self, num_tokens, dtype_bytes)

    # ---- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type == "qwen3_5":
            text = dict(raw.get("text_config") or {})
            if not text:
                raise ConfigError("model_type 'qwen3_5' needs a text_config")
            # token ids and tying may live at the top level of the multimodal config
            for key in ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings"):
                if key not in text and key in raw:
                    text[key] = raw[key]
        elif model_type == "qwen3_5_text":
            text = raw
        else:
            raise ConfigError(f"unsupported model_type {model_type!r}; qwenpd serves {SUPPORTED_MODEL_TYPES}")
        try:
            config = cls._from_text_dict(text, model_type=model_type)
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from e
        if model_type == "qwen3_5" and raw.get("vision_config"):
            config = config.replace(vision=VisionConfig.from_hf_dict(raw["vision_config"], raw))
        return config

    @classmethod
    def _from_text_dict(cls, t: dict[str, Any], model_type: str) -> "ModelConfig":
        rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"unsupported rope_type {rope_type!r}")
        theta = rope.get("rope_theta", t.get("rope_theta", 10_000.0))
        partial = rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25))
        n_layers = int(t["num_hidden_layers"])
        layer_types = t.get("layer_types")
        if layer_types is None:
            interval = int(t.get("full_attention_interval", 4))
            layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
        eos = t.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        heads = int(t["num_attention_heads"])
        return cls(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(t.get("num_key_value_heads", heads)),
            head_dim=int(t.get("head_dim") or int(t["hidden_size"]) // heads),
            linear_num_key_heads=int(t["linear_num_key_heads"]),
            linear_num_value_heads=int(t["linear_num_value_heads"]),
            linear_key_head_dim=int(t["linear_key_head_dim"]),
            linear_value_head_dim=int(t["linear_value_head_dim"]),
            linear_conv_kernel_dim=int(t.get("linear_conv_kernel_dim", 4)),
            layer_types=tuple(layer_types),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            partial_rotary_factor=float(partial),
            max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(int(x) for x in eos_ids),
            bos_token_id=t.get("bos_token_id"),
            pad_token_id=t.get("pad_token_id"),
            torch_dtype=str(t.get("dtype") or t.get("torch_dtype") or "float32"),
            model_type=model_type,
            hidden_act=t.get("hidden_act", "silu"),
            attention_bias=bool(t.get("attention_bias", False)),
            mrope_section=tuple(rope.get("mrope_section", ())),
            mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            mtp_num_hidden_layers=int(t.get("mtp_num_hidden_layers", 0)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A text-only (`qwen3_5_text`) config.json that transformers loads as Qwen3_5ForCausalLM."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        if self.mrope_section:
            rope["mrope_section"] = list(self.mrope_section)
            rope["mrope_interleaved"] = self.mrope_interleaved
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        return {
            "architectures": ["Qwen3_5ForCausalLM"],
            "model_type": "qwen3_5_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": eos,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": self.hidden_act,
            "attention_bias": False,
            "dtype": self.torch_dtype,
            **({"mtp_num_hidden_layers": self.mtp_num_hidden_layers} if self.mtp_num_hidden_layers else {}),
        }

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that decide what state a model produces (dtype excluded: it is checked per tensor)."""
        d = dataclasses.asdict(self)
        d.pop("torch_dtype")
        d.pop("mtp_num_hidden_layers")  # the draft head changes no state of the main model
        if d["vision"] is None:  # text-only models keep the fingerprint they had before the vision tower
            d.pop("vision")
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def layer_group(self) -> int:
        """Length of the shortest repeating unit of `layer_types` (4 for Qwen3.5/3.6: 3 DeltaNet + 1 attention)."""
        n = self.num_hidden_layers
        return next(p for p in range(1, n + 1)
                    if n % p == 0 and self.layer_types == self.layer_types[:p] * (n // p))

    def with_num_layers(self, num_layers: int) -> "ModelConfig":
        """The same model with `num_layers` layers: whole repeats of `layer_group`, so every layer keeps its
        shapes and the hybrid pattern (and with it the state per layer type) stays that of the real model."""
        group = self.layer_group
        if num_layers < 1 or num_layers % group:
            kinds = f"{self.layer_types[:group].count(LINEAR)} DeltaNet + {self.layer_types[:group].count(FULL)} " \
                    "attention layers"
            raise ConfigError(f"num_layers must be a positive multiple of {group} (one group of {kinds}), "
                              f"got {num_layers}")
        return self.replace(num_hidden_layers=num_layers,
                            layer_types=self.layer_types[:group] * (num_layers // group))


def _pattern(groups: int, linear_per_group: int = 3) -> tuple[str, ...]:
    return tuple(([LINEAR] * linear_per_group + [FULL]) * groups)


# One table of named shapes. `tiny` is the embedded default (tests, demo); `small` is the benchmark model;
# `qwen3.6-27b` and `qwen3.5-2b` have the real shapes (their weights are not available here: `init-model` writes
# random weights of those shapes, `--num-layers` cuts the depth, `bench/sizing.py` sizes them).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
        linear_conv_kernel_dim=4, layer_types=_pattern(1), max_position_embeddings=8192, mtp_num_hidden_layers=1,
    ),
    "small": ModelConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, layer_types=_pattern(2), max_position_embeddings=32768,
        torch_dtype="bfloat16", mtp_num_hidden_layers=1,
    ),
    # Qwen/Qwen3.6-27B (same architecture as Qwen3.5-27B, model_type qwen3_5): the model card gives hidden 5120,
    # 64 layers as 16 x (3 x Gated DeltaNet + 1 x gated attention), DeltaNet 48 V / 16 QK heads of dim 128,
    # attention 24 Q / 4 KV heads of dim 256 with rotary dim 64, vocabulary 248320; THUDM/slime
    # scripts/models/qwen3.5-27B.sh agrees and adds FFN 17408, rotary base 1e7 and untied embeddings.
    "qwen3.6-27b": ModelConfig(
        vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
        num_attention_heads=24, num_key_value_heads=4, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, layer_types=_pattern(16), max_position_embeddings=262144,
        eos_token_ids=(248044,), torch_dtype="bfloat16", model_type="qwen3_5",
        mrope_section=(11, 11, 10), mrope_interleaved=True, mtp_num_hidden_layers=1,
    ),
    # Qwen/Qwen3.5-2B, as its model card is quoted (awesomeagents.ai, apxml.com): hidden 2048, 24 layers as
    # 6 x (3 x Gated DeltaNet + 1 x gated attention), FFN 6144, DeltaNet 16 V / 16 QK heads of dim 128, attention
    # 8 Q / 2 KV heads of dim 256 with rotary dim 64, vocabulary 248320. Assumed, not read from its config.json:
    # tied embeddings (as in THUDM/slime's Qwen3.5-0.8B script; the untied count, 2.4B text parameters, would not
    # be a "2B"), and the 27B's rope, token ids and context.
    "qwen3.5-2b": ModelConfig(
        vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, layer_types=_pattern(6), max_position_embeddings=262144,
        tie_word_embeddings=True, eos_token_ids=(248044,), torch_dtype="bfloat16", model_type="qwen3_5",
        mrope_section=(11, 11, 10), mrope_interleaved=True, mtp_num_hidden_layers=1,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
