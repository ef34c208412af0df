"""`init-model`: streamed writing, `--num-layers`, and real-model shapes that transformers accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwenpd.engine import Engine
from qwenpd.engine.config import FULL, LINEAR, ConfigError, preset
from qwenpd.engine.init_model import _weight_blocks, random_weights, write_weights
from qwenpd.engine.weight_layout import expected_weight_shapes


def _qwenpd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenpd.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("max_elements", [1, 100, 1000, 5000], ids=lambda m: f"block{m}")
def test_weights_drawn_in_blocks_equal_whole_draws(max_elements):
    """Cutting a tensor into row blocks (what keeps a 27B-shaped checkpoint within memory) draws the same weights
    as one draw per tensor: norms (1-D), conv (3-D), projections, the embedding."""
    c = preset("tiny")
    whole = random_weights(c, seed=7)
    parts: dict[str, list[torch.Tensor]] = {}
    for name, block in _weight_blocks(c, 7, torch.float32, max_elements=max_elements):
        parts.setdefault(name, []).append(block)
    assert max(len(p) for p in parts.values()) > 1 or max_elements > 1000  # the small blocks really cut
    for name, t in whole.items():
        assert torch.equal(torch.cat(parts[name]), t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_file_is_safetensors_of_the_weights(tmp_path, dtype):
    c = preset("tiny")
    path = tmp_path / "model.safetensors"
    nbytes = write_weights(path, c, seed=3, dtype=dtype, max_elements=512)
    loaded = load_file(str(path))
    want = random_weights(c, seed=3)
    stored = {k: k if k == "lm_head.weight" or k.startswith("mtp.") else "model." + k for k in want}
    assert set(loaded) == set(stored.values()) and "mtp.fc.weight" in loaded  # the MTP head too
    for name, t in want.items():
        got = loaded[stored[name]]
        assert got.dtype == dtype and torch.equal(got, t.to(dtype)), name
    assert nbytes == sum(t.numel() * t.element_size() for t in loaded.values())
    assert not (tmp_path / "model.safetensors.partial").exists()


def test_num_layers_repeats_the_group_and_transformers_loads_it(tmp_path):
    """`--num-layers 8` on tiny: 2 groups of 3 DeltaNet + 1 attention; a valid HF checkpoint that transformers'
    Qwen3_5ForCausalLM loads without missing or unexpected tensors, with our logits."""
    from transformers import Qwen3_5ForCausalLM

    r = _qwenpd("init-model", "--preset", "tiny", "--num-layers", "8", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "8 layers" in r.stdout
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8 and cfg["layer_types"] == ([LINEAR] * 3 + [FULL]) * 2
    hf, info = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ids = list(range(3, 40))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = Engine(tmp_path / "m", dtype="float32").forward_all(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n", ["6", "0", "-4"])
def test_num_layers_not_a_whole_group_is_refused(tmp_path, n):
    r = _qwenpd("init-model", "--preset", "qwen3.6-27b", "--num-layers", n, "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "multiple of 4" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="3 DeltaNet \\+ 1 attention"):
        preset("tiny").with_num_layers(int(n))


@pytest.mark.parametrize("name", ["qwen3.6-27b", "qwen3.5-2b"])
def test_real_shapes_cut_to_one_group_are_what_transformers_builds(name):
    """The tensors init-model writes for a real model cut to 4 layers (shapes only: the 27B's would be 8 GB) are
    exactly the parameters of transformers' Qwen3_5ForCausalLM built from the config.json it writes."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    c = preset(name).with_num_layers(4)
    hf_dict = c.to_hf_dict()
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**hf_dict))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    ours = {k if k == "lm_head.weight" else "model." + k: v for k, v in expected_weight_shapes(c).items()}
    assert ours == theirs
    assert c.layer_types == (LINEAR, LINEAR, LINEAR, FULL)
    full = preset(name)
    assert c.with_num_layers(full.num_hidden_layers) == full  # a cut model grows back into the real one


def test_real_27b_shapes():
    """The preset against the Qwen3.6-27B model card (see the source comment in engine/config.py)."""
    c = preset("qwen3.6-27b")
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (5120, 64, 17408, 248320)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (24, 4, 256, 64)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
            c.linear_conv_kernel_dim) == (16, 48, 128, 128, 4)
    assert c.layer_group == 4 and len(c.attention_layers) == 16 and not c.tie_word_embeddings
    assert 26.5e9 < c.num_parameters() < 27.5e9  # text model only (no vision tower, no MTP head)
