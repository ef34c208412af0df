"""A checkpoint's text and MTP tensors by name and shape, and the safetensors files that hold them: what the
engine's loader (weights.py) checks a checkpoint against, and what a service checks before any engine loads,
torch-free (serve all's parent reads headers only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from qwenpd.engine.config import FULL, LINEAR, ModelConfig


class WeightError(ValueError):
    """A checkpoint whose tensors do not match its config (missing, unexpected shape, unreadable)."""


def expected_weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical (prefix-free) name -> shape of every text-model tensor transformers would load."""
    h = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c.vocab_size, h), "norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
        if kind == LINEAR:
            q = p + "linear_attn."
            shapes[q + "in_proj_qkv.weight"] = (c.conv_dim, h)
            shapes[q + "in_proj_z.weight"] = (c.linear_value_dim, h)
            shapes[q + "in_proj_b.weight"] = (c.linear_num_value_heads, h)
            shapes[q + "in_proj_a.weight"] = (c.linear_num_value_heads, h)
            shapes[q + "conv1d.weight"] = (c.conv_dim, 1, c.linear_conv_kernel_dim)
            shapes[q + "dt_bias"] = (c.linear_num_value_heads,)
            shapes[q + "A_log"] = (c.linear_num_value_heads,)
            shapes[q + "norm.weight"] = (c.linear_value_head_dim,)
            shapes[q + "out_proj.weight"] = (h, c.linear_value_dim)
        else:
            q = p + "self_attn."
            shapes[q + "q_proj.weight"] = (2 * c.num_attention_heads * c.head_dim, h)
            shapes[q + "k_proj.weight"] = (c.num_key_value_heads * c.head_dim, h)
            shapes[q + "v_proj.weight"] = (c.num_key_value_heads * c.head_dim, h)
            shapes[q + "o_proj.weight"] = (h, c.num_attention_heads * c.head_dim)
            shapes[q + "q_norm.weight"] = (c.head_dim,)
            shapes[q + "k_norm.weight"] = (c.head_dim,)
    return shapes


MTP = "mtp."


def mtp_weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the multi-token-prediction head's tensors (as the public checkpoints store them, under
    `mtp.`): fc over [normed embedding | normed hidden], its two input norms, `mtp_num_hidden_layers` gated
    attention decoder layers with their MLPs, and its final norm. Embedding and lm_head are the main model's."""
    if not c.mtp_num_hidden_layers:
        return {}
    h = c.hidden_size
    shapes = {MTP + "fc.weight": (h, 2 * h), MTP + "pre_fc_norm_embedding.weight": (h,),
              MTP + "pre_fc_norm_hidden.weight": (h,), MTP + "norm.weight": (h,)}
    layer = expected_weight_shapes(c.replace(num_hidden_layers=1, layer_types=(FULL,), tie_word_embeddings=True))
    for i in range(c.mtp_num_hidden_layers):
        shapes.update({f"{MTP}layers.{i}.{name[len('layers.0.'):]}": shape
                       for name, shape in layer.items() if name.startswith("layers.0.")})
    return shapes


def check_mtp_head(model_dir: str | Path, config: ModelConfig) -> None:
    """WeightError unless the checkpoint holds the MTP head its config declares, every `mtp.*` tensor with its
    shape (reads the file headers only: what a service checks before it starts)."""
    expected = mtp_weight_shapes(config)
    if not expected:
        raise WeightError(f"checkpoint {model_dir} declares no MTP head (no mtp_num_hidden_layers in config.json), "
                          "so it has no mtp.* weights to draft with")
    found: dict[str, tuple[int, ...]] = {}
    for path in weight_files(Path(model_dir)):
        for name, entry in safetensors_header(path)[0].items():
            canon = name[len("model."):] if name.startswith("model." + MTP) else name
            if canon in expected:
                found[canon] = tuple(entry["shape"])
    missing = sorted(set(expected) - set(found))
    if missing:
        raise WeightError(f"checkpoint {model_dir} has no MTP head: it lacks {len(missing)} of the "
                          f"{len(expected)} mtp.* tensors, e.g. {missing[:3]}")
    for name, shape in found.items():
        if shape != expected[name]:
            raise WeightError(f"tensor {name!r} has shape {shape}, expected {expected[name]}")


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"shards listed in {index.name} are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightError(f"no safetensors weights in {model_dir}")
    return files


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensor entries (name -> {dtype, shape, data_offsets}) and the offset of its data: the
    layout is an 8-byte little-endian header length, the JSON header, then the data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries, 8 + length
