"""The MTP head against transformers' own modules (its decoder layer, RMSNorm and rotary embedding) loaded with the
checkpoint's `mtp.*` tensors, and the head's loading rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenpd.engine import Engine
from qwenpd.engine.mtp import MTPHead
from qwenpd.engine.weights import WeightError, load_mtp_weights


def _reference(model_dir, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """What vLLM's Qwen3_5MultiTokenPredictor computes, built from transformers' Qwen3.5 modules (fp32)."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    raw = json.loads((model_dir / "config.json").read_text())
    cfg = Qwen3_5TextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    w = load_file(str(model_dir / "model.safetensors"))
    full = cfg.layer_types.index("full_attention")
    layer = m.Qwen3_5DecoderLayer(cfg, layer_idx=full).eval()
    layer.load_state_dict({k[len("mtp.layers.0."):]: v.float() for k, v in w.items()
                           if k.startswith("mtp.layers.0.")})

    def norm(name: str) -> m.Qwen3_5RMSNorm:
        n = m.Qwen3_5RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        n.weight.data = w[name].float()
        return n

    t = tokens.shape[0]
    with torch.no_grad():
        e = w["model.embed_tokens.weight"].float()[tokens]
        x = torch.cat([norm("mtp.pre_fc_norm_embedding.weight")(e), norm("mtp.pre_fc_norm_hidden.weight")(hidden)],
                      -1) @ w["mtp.fc.weight"].float().T
        positions = torch.arange(t)[None]
        rope = m.Qwen3_5TextRotaryEmbedding(cfg)(x[None], positions)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        x = layer(x[None], position_embeddings=rope, attention_mask=mask, position_ids=positions)[0]
        return norm("mtp.norm.weight")(x) @ w["lm_head.weight"].float().T


def test_the_head_is_transformers_modules_with_its_weights(tiny_model_dir):
    """fp32, 40 positions computed at once and then one at a time through the head's KV cache: both are the
    reference's logits."""
    eng = Engine(tiny_model_dir, dtype="float32")
    head = MTPHead(eng.config, load_mtp_weights(tiny_model_dir, eng.config, torch.float32), eng.model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, eng.config.hidden_size, generator=g)
    tokens = torch.randint(0, eng.config.vocab_size, (40,), generator=g)
    ref = _reference(tiny_model_dir, hidden, tokens)
    _, logits = head.forward(hidden, tokens, torch.arange(40), head.new_cache())
    assert (logits - ref).abs().max() < 1e-4
    cache = head.new_cache()
    head.forward(hidden[:30], tokens[:30], torch.arange(30), cache)
    steps = [head.forward(hidden[i:i + 1], tokens[i:i + 1], torch.tensor([i]), cache)[1] for i in range(30, 40)]
    assert (torch.cat(steps) - ref[30:]).abs().max() < 1e-4


def test_a_checkpoint_without_the_head_names_what_it_lacks(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "mtp.fc.weight"}
    save_file(tensors, str(path), metadata={"format": "pt"})
    eng = Engine(tmp_path / "m")  # the main model loads without it
    with pytest.raises(WeightError, match=r"mtp\.fc\.weight"):
        load_mtp_weights(tmp_path / "m", eng.config, torch.float32)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("mtp_num_hidden_layers")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match="mtp_num_hidden_layers"):
        load_mtp_weights(tmp_path / "m", Engine(tmp_path / "m").config, torch.float32)


@pytest.mark.parametrize("variant", ["text", "conv5_tied"])
def test_own_vocab_reads_the_whole_embedding_and_lm_head_once(hf_checkpoint, tmp_path, variant):
    """A tensor-parallel leader's head (own_vocab): the whole embedding and lm_head rows as stored, bf16; with tied
    embeddings one tensor for both."""
    from qwenpd.engine.config import ModelConfig
    from qwenpd.engine.weights import DRAFT_EMBED, DRAFT_HEAD
    from tests.hf_models import with_mtp_head

    path = with_mtp_head(hf_checkpoint(variant), tmp_path / "ckpt")
    config = ModelConfig.from_pretrained(path)
    weights = load_mtp_weights(path, config, torch.bfloat16, own_vocab=True)
    stored = {}
    for f in path.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    embed = next(t for n, t in stored.items() if n.endswith("embed_tokens.weight"))
    assert torch.equal(weights[DRAFT_EMBED], embed.to(torch.bfloat16))
    if config.tie_word_embeddings:
        assert weights[DRAFT_HEAD] is weights[DRAFT_EMBED]
    else:
        assert torch.equal(weights[DRAFT_HEAD], stored["lm_head.weight"].to(torch.bfloat16))
    assert DRAFT_EMBED not in load_mtp_weights(path, config, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("block", [4096, 16, 7], ids=["one-block", "blocks", "ragged-blocks"])
def test_head_attention_by_matmuls_equals_sdpa(monkeypatch, dtype, n, block):
    """The head's attention (mtp._attend: grouped matmuls, fp32 scores, in one block of keys or several joined by
    an online softmax) against torch's SDPA, the path it takes past ATTEND_ROWS rows: causal over a cache of
    positions 0..end-1, query head h reading kv head h // (Hq / Hkv)."""
    from qwenpd.engine import mtp

    g = torch.Generator().manual_seed(n)
    hq, hkv, d, end = 8, 2, 32, 50
    q = torch.randn(n, hq, d, generator=g)
    keys, values = (torch.randn(hkv, end + 7, d, generator=g).to(dtype)[:, :end] for _ in range(2))
    positions = torch.arange(end - n, end)
    monkeypatch.setattr(mtp, "ATTEND_BLOCK", block)
    got = mtp._attend(q, keys, values, positions, d ** -0.5)
    monkeypatch.setattr(mtp, "ATTEND_ROWS", 0)
    want = mtp._attend(q, keys, values, positions, d ** -0.5)
    assert got.shape == want.shape == (n, hq, d) and got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    # position p sees keys 0..p only, head h its kv head h // 4 (head 3: kv head 0, where h % 2 would be 1)
    row = torch.softmax((q[-1, 3] @ keys[0].float().T) * d ** -0.5, dim=-1) @ values[0].float()
    torch.testing.assert_close(got[-1, 3].float(), row, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    if n > 1:
        early = torch.softmax((q[0, 0] @ keys[0, :end - n + 1].float().T) * d ** -0.5, dim=-1)
        torch.testing.assert_close(got[0, 0].float(), early @ values[0, :end - n + 1].float(),
                                   atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
