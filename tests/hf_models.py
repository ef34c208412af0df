"""Random Qwen3.5 checkpoints written by transformers itself (the oracle), in several shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BASE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4, max_position_embeddings=4096,
    rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=0, pad_token_id=None,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)

# name -> overrides; together they cover attention every 2nd layer, GQA and DeltaNet head ratios != 1,
# k_dim != v_dim, conv kernel != 4, tied embeddings and the multimodal layout with mtp.* tensors present.
VARIANTS: dict[str, dict] = {
    "text": {},
    "every2nd": dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                     num_attention_heads=6, num_key_value_heads=2, linear_num_key_heads=1,
                     linear_num_value_heads=3, linear_conv_kernel_dim=3, linear_key_head_dim=8,
                     linear_value_head_dim=16),
    "conv5_tied": dict(num_hidden_layers=5, linear_conv_kernel_dim=5, tie_word_embeddings=True,
                       layer_types=["linear_attention"] * 3 + ["full_attention", "linear_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=32, num_key_value_heads=1),
    "multimodal": {},
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Replace transformers' small init with O(1)-activation weights so logits are well separated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 1.0, generator=g).log())
            elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("lm_head.weight", "embed_tokens.weight")):
                # logits of std ~0.5: the 1e-4 logit tolerance is then a relative bound on fp32 rounding, which
                # the DeltaNet output norm amplifies wherever a head's output is a near-cancellation
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def save_hf_checkpoint(out: Path, variant: str, seed: int = 0, sharpen: bool = True, **overrides) -> Path:
    """transformers' own save_pretrained of a random model; `sharpen` replaces its small init (near-uniform
    logits: near-ties everywhere, the hard case for crash resume) with O(1)-activation weights. `overrides`: config
    fields over the variant's."""
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    kw = {**BASE, **VARIANTS[variant], **overrides}
    torch.manual_seed(seed)
    if variant == "multimodal":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
        text = dict(kw)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2, 1, 1], "mrope_interleaved": True}
        cfg = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
        model = Qwen3_5ForConditionalGeneration(cfg)
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**kw))
    if sharpen:
        _randomise(model, seed)
    model.eval()
    model.save_pretrained(out)
    if variant == "multimodal":  # real checkpoints also carry the MTP head, which qwenpd must skip
        path = out / "model.safetensors"
        tensors = load_file(str(path))
        tensors["mtp.fc.weight"] = torch.randn(64, 128)
        tensors["mtp.layers.0.mlp.up_proj.weight"] = torch.randn(96, 64)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out


def load_hf(path: Path, variant: str):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    cls = Qwen3_5ForConditionalGeneration if variant == "multimodal" else Qwen3_5ForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def with_mtp_head(src: Path, dst: Path) -> Path:
    """A transformers-made checkpoint with an MTP head added (random tensors of the public layout)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    from qwenpd.engine.config import ModelConfig
    from qwenpd.engine.weight_layout import mtp_weight_shapes

    tensors = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name, shape in mtp_weight_shapes(ModelConfig.from_pretrained(dst)).items():
        tensors[name] = (0.1 * torch.randn(shape, generator=g) if len(shape) == 1
                         else torch.randn(shape, generator=g) / shape[-1] ** 0.5)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)
# the checkpoint's image processor spec (what Qwen3.5's preprocessor_config.json holds, at this tower's patch size)
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
                "patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}}


def save_vision_checkpoint(out: Path, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                           preprocessor: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A multimodal checkpoint made by transformers (Qwen3_5ForConditionalGeneration, random weights; by default
    the tiny BASE text model with a 2-block vision tower), with what serving it needs beside: a tokenizer holding
    Qwen's vision tokens, a chat template that renders image and video parts, and the image processor's
    preprocessor_config.json. `text` / `vision` / `preprocessor` replace the defaults (bench/vision.py: `small`
    with a real-width tower)."""
    import json

    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from qwenpd.engine.init_model import SPECIAL_TOKENS, VISION_CHAT_TEMPLATE, VISION_TOKENS, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = dict(text or {**BASE, "rope_parameters": {**BASE["rope_parameters"], "mrope_section": [2, 1, 1],
                                                     "mrope_interleaved": True}})
    tok = build_tokenizer(min(text["vocab_size"], 4096), SPECIAL_TOKENS + VISION_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + VISION_TOKENS}
    text.update(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision or VISION, tie_word_embeddings=False,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen3_5ForConditionalGeneration(cfg)
    _randomise(model, seed)
    model.eval()
    model.to(dtype).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": VISION_CHAT_TEMPLATE}))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor or PREPROCESSOR))
    return out
