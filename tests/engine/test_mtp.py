"""The MTP head against transformers' own modules (its decoder layer, RMSNorm and rotary embedding) loaded with the
checkpoint's `mtp.*` tensors, and the head's loading rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenpd.engine import Engine
from qwenpd.engine.mtp import MTPCache, MTPHead
from qwenpd.engine.pages import OutOfPages
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
    eng = Engine(tiny_model_dir, dtype="float32", speculative=True)
    head = MTPHead(eng.config, load_mtp_weights(tiny_model_dir, eng.config, torch.float32), eng.model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, eng.config.hidden_size, generator=g)
    tokens = torch.randint(0, eng.config.vocab_size, (40,), generator=g)
    ref = _reference(tiny_model_dir, hidden, tokens)
    _, logits = head.forward(hidden, tokens, torch.arange(40), mtp_cache(eng, 40))
    assert (logits - ref).abs().max() < 1e-4
    cache = mtp_cache(eng, 40)
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
    with pytest.raises(WeightError, match="mtp_num_hidden_layers"):  # speculative decoding asked for: refused
        Engine(tmp_path / "m", speculative=True)


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
def test_head_attention_over_its_pages(tiny_model_dir, monkeypatch, dtype, n, block):
    """The head's KV in its own pools of the paged cache, at a sequence's scattered pages (MTPCache): drafting
    rows (attend_pages: grouped matmuls in fp32 over one block of pages or several joined by an online softmax)
    against the prefill kernel, the path past ATTEND_ROWS rows, and against plain softmax rows: causal over
    positions 0..end-1, query head h reading kv head h // (Hq / Hkv); the model's own pools untouched."""
    from qwenpd.engine import mtp
    from qwenpd.engine.config import ModelConfig
    from qwenpd.engine.kv_cache import PagedKVCache
    from qwenpd.kernels.paged_attention import paged

    config = ModelConfig.from_pretrained(tiny_model_dir)
    cache = PagedKVCache(config, dtype, torch.device("cpu"), page_size=4, num_bytes=None, draft_layers=1)
    cache.sequence().reserve(9)  # another sequence's pages first: this one's do not start at page 1
    end = 50
    head = mtp.MTPCache.new(cache, end)
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    g = torch.Generator().manual_seed(n)
    keys, values = (torch.randn(end, hkv, d, generator=g).to(dtype) for _ in range(2))
    head.write(0, 0, keys[:end - n], values[:end - n])
    head.write(0, end - n, keys[end - n:], values[end - n:])
    q = torch.randn(n, hq, d, generator=g)
    monkeypatch.setattr(paged, "CPU_BLOCK_TOKENS", block)
    got = head.attend(0, q, end - n, d ** -0.5)
    monkeypatch.setattr(mtp, "ATTEND_ROWS", 0)
    want = head.attend(0, q, end - n, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape == (n, hq, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    # position p sees keys 0..p only, head h its kv head h // group
    h = hq - 1
    kv = h // (hq // hkv)
    row = torch.softmax((q[-1, h] @ keys[:, kv].float().T) * d ** -0.5, dim=-1) @ values[:, kv].float()
    torch.testing.assert_close(got[-1, h], row, atol=tol, rtol=0)
    if n > 1:
        early = torch.softmax((q[0, 0] @ keys[:end - n + 1, 0].float().T) * d ** -0.5, dim=-1)
        torch.testing.assert_close(got[0, 0], early @ values[:end - n + 1, 0].float(), atol=tol, rtol=0)
    assert all(not p.any() for p in cache.k[:cache.draft_first] + cache.v[:cache.draft_first])
    copied = head.copy_out(0, end)["mtp.0.k"]
    assert torch.equal(copied, keys.transpose(0, 1))


def test_a_cache_without_the_heads_pools_says_so(tiny_model_dir):
    eng = Engine(tiny_model_dir, dtype="float32")  # not speculative: no pools for the head
    head = MTPHead(eng.config, load_mtp_weights(tiny_model_dir, eng.config, torch.float32), eng.model)
    with pytest.raises(ValueError, match="speculative=True"):
        head.forward(torch.zeros(2, eng.config.hidden_size), torch.tensor([1, 2]), torch.arange(2),
                     mtp_cache(eng, 4))


def mtp_cache(eng: Engine, tokens: int) -> MTPCache:
    return MTPCache.new(eng.kv_cache, tokens)


def test_the_heads_kv_is_in_the_kv_budget_and_the_sequences_pages(tiny_model_dir):
    """With speculative decoding the paged cache holds the head's layers beside the attention layers': a fixed
    budget holds fewer, larger pages (the head's bytes are counted, not added past it), kv_cache_bytes_for sizes
    for them, and a sequence's head KV sits in its own pages, freed with them."""
    from qwenpd.engine.engine_config import MAX_SPECULATIVE_TOKENS, EngineConfig
    from qwenpd.engine.kv_cache import kv_cache_bytes_for, page_bytes
    from qwenpd.engine.pages import pages_for

    config = Engine(tiny_model_dir, dtype="float32", warm_up=False).config
    budget = 40 * page_bytes(config, 16, torch.float32)
    plain = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=budget, page_size=16, warm_up=False)
    spec = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=budget, page_size=16, speculative=True)
    per_page = page_bytes(config, 16, torch.float32, draft_layers=config.mtp_num_hidden_layers)
    assert per_page > page_bytes(config, 16, torch.float32)
    assert spec.kv_cache.num_pages == budget // per_page < plain.kv_cache.num_pages == 40
    assert spec.kv_cache.num_bytes <= budget
    assert len(spec.kv_cache.k) == len(config.attention_layers) + config.mtp_num_hidden_layers
    sized = EngineConfig(str(tiny_model_dir), dtype="float32", page_size=16, speculative=True)
    assert kv_cache_bytes_for(sized, 100) == (7 + 2) * per_page
    # compiled block tables as wide as the pages a sequence of 64 tokens holds with the drafts' allowance
    assert spec.default_buckets(16, 1, max_context=64).widths[-1] >= pages_for(64 + MAX_SPECULATIVE_TOKENS, 16)
    assert plain.default_buckets(16, 1, max_context=64).widths[-1] == pages_for(64, 16)
    free = spec.kv_cache.allocator.free
    state = spec.new_state()
    state.reserve(40)
    cache = MTPCache(state.kv)
    kv = torch.randn(40, config.num_key_value_heads, config.head_dim)
    cache.write(0, 0, kv, kv)
    assert torch.equal(cache.copy_out(0, 40)["mtp.0.v"], kv.transpose(0, 1))
    with pytest.raises(OutOfPages):  # past its pages
        cache.write(0, 48, kv[:1], kv[:1])
    state.release()
    assert spec.kv_cache.allocator.free == free
