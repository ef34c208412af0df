"""Checkpoint loading: configs, weights, clear errors, fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenpd.engine import PRESETS, ConfigError, Engine, ModelConfig
from qwenpd.engine.weight_layout import WeightError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_presets_are_consistent():
    small = PRESETS["small"]
    assert 165e6 < small.num_parameters() < 185e6  # ~174M
    big = PRESETS["qwen3.6-27b"]
    assert big.layer_types.count("linear_attention") == 48
    # docs/design.md: recurrent 3 MiB/layer x 48 + conv, KV 64 KiB/token
    assert big.state_bytes(0) == 48 * (3 * 2**20 + big.conv_dim * 3 * 2)
    assert big.state_bytes(1) - big.state_bytes(0) == 64 * 1024


def test_multimodal_config_and_rope_parameters(hf_checkpoint):
    cfg = ModelConfig.from_pretrained(hf_checkpoint("multimodal"))
    assert cfg.model_type == "qwen3_5" and cfg.mrope_section == (2, 1, 1) and cfg.mrope_interleaved
    assert cfg.rotary_dim == 8


def test_unknown_model_type_is_refused(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("text"), tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        Engine(d)


def test_inconsistent_config_is_refused():
    with pytest.raises(ConfigError, match="not a multiple"):
        PRESETS["tiny"].replace(num_attention_heads=5)
    with pytest.raises(ConfigError, match="layer_types"):
        PRESETS["tiny"].replace(layer_types=("linear_attention",))


def test_missing_tensor_is_named(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("text"), tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.linear_attn.A_log"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(WeightError, match=r"layers\.1\.linear_attn\.A_log"):
        Engine(d)


def test_wrong_shape_is_named(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("text"), tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.3.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(WeightError, match=r"layers\.3\.self_attn\.k_proj\.weight.*\(3, 64\)"):
        Engine(d)


def test_sharded_checkpoint_loads(tmp_path, hf_checkpoint):
    src = hf_checkpoint("text")
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    t = load_file(str(src / "model.safetensors"))
    names = sorted(t)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: t[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = Engine(src), Engine(d)
    assert a.fingerprint == b.fingerprint
    ids = [1, 2, 3, 4]
    assert torch.equal(a.forward_all(ids), b.forward_all(ids))


def test_fingerprint_distinguishes_models(tmp_path, tiny_model_dir):
    from qwenpd.engine.init_model import init_model

    other = init_model(tmp_path / "other", "tiny", seed=1)
    assert Engine(tiny_model_dir).fingerprint != Engine(other).fingerprint
    assert Engine(tiny_model_dir).fingerprint == Engine(tiny_model_dir, dtype="bfloat16").fingerprint


def test_init_model_is_deterministic(tmp_path):
    from qwenpd.engine.init_model import init_model

    a, b = init_model(tmp_path / "a", "tiny", seed=5), init_model(tmp_path / "b", "tiny", seed=5)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_token_outside_vocab_and_context_are_refused(tiny_model_dir):
    eng = Engine(tiny_model_dir)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.prefill([1, eng.config.vocab_size])
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        eng.prefill([1] * (eng.config.max_position_embeddings + 1), chunk_size=4096)


def test_decode_step_past_the_context_is_refused(tiny_model_dir):
    from qwenpd.engine import DecodeBatch

    eng = Engine(tiny_model_dir)
    _, state = eng.prefill([1, 2, 3])
    batch = DecodeBatch(eng, 2)
    batch.add(state)
    state.num_tokens = eng.config.max_position_embeddings  # as if the context were full
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        batch.step([5])


def test_encode_at_most_refuses_what_cannot_fit_without_tokenizing_it_all(tiny_model_dir):
    """Tokenizer.encode_at_most: the exact ids of what may fit; None, quickly, for what certainly does not."""
    import time

    from qwenpd.engine.tokenizer import PIECE_CHARS, Tokenizer

    tok = Tokenizer(tiny_model_dir)
    short = "the quick brown fox jumps over the lazy dog " * 50
    assert tok.encode_at_most(short, 10_000) == tok.encode(short)
    long_text = "alpha beta, gamma δέλτα 12345 " * (3 * PIECE_CHARS // 30)  # several pieces
    true = len(tok.encode(long_text))
    assert tok.encode_at_most(long_text, true) == tok.encode(long_text)  # at the limit: exact, whole
    assert tok.encode_at_most(long_text, true // 2) is None  # counted piece by piece, past the limit
    t0 = time.monotonic()
    assert tok.encode_at_most("word " * 2_000_000, 8192) is None  # 10 MB: refused from its length
    assert time.monotonic() - t0 < 1.0
