"""Speculative decoding with the MTP head (engine/speculative.py): the tokens and log-probabilities of plain
decoding, greedy and seeded sampling, whatever the drafts, with either rollback."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenpd.engine import Engine
from qwenpd.engine.generate import generate, generate_speculative
from qwenpd.engine.mtp import MTPHead
from qwenpd.engine.sampling import SamplingParams
from qwenpd.engine.speculative import Drafter
from qwenpd.engine.weights import load_mtp_weights, mtp_weight_shapes

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, seed=7, max_tokens=48, ignore_eos=True)


def _head(engine: Engine, model_dir) -> MTPHead:
    return MTPHead(engine.config, load_mtp_weights(model_dir, engine.config, engine.dtype), engine.model)


def _oracle_drafts(monkeypatch, sequence: list[int]) -> None:
    """Drafts that are the right tokens except where (position % 3) says otherwise: every accept/reject pattern
    (all drafts right, the first wrong, one in the middle wrong) occurs along a sequence."""
    def draft(self, hidden, next_tokens, start, k):
        first = start + len(next_tokens) + 1  # the absolute index of the token the first draft stands for
        out = sequence[first:first + k]
        out += [0] * (k - len(out))
        wrong = (first * 2654435761 >> 9) % 3  # 0: all right, 1: the first wrong, 2: the second wrong
        if wrong and wrong <= len(out):
            out[wrong - 1] = (out[wrong - 1] + 1) % 300
        return out
    monkeypatch.setattr(Drafter, "draft", draft)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_identical_to_plain_decoding_whatever_the_drafts(engine, tiny_model_dir, monkeypatch, params, rollback, k):
    prompt = [5 + (i * 37) % 400 for i in range(50)]
    ref = generate(engine, prompt, params)
    head = _head(engine, tiny_model_dir)
    real = generate_speculative(engine, head, prompt, params, k, rollback=rollback)  # the head's own drafts
    assert (real.token_ids, real.logprobs) == (ref.token_ids, ref.logprobs)
    _oracle_drafts(monkeypatch, prompt + ref.token_ids)
    got = generate_speculative(engine, head, prompt, params, k, rollback=rollback)
    assert (got.token_ids, got.logprobs, got.text) == (ref.token_ids, ref.logprobs, ref.text)
    assert 0 < got.accepted_tokens < got.draft_tokens  # drafts were accepted and rejected along the way
    assert sum(got.accepted_at) == got.accepted_tokens


def _with_head(src, dst):
    """A transformers-made checkpoint with an MTP head added (random tensors of the public layout)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    from qwenpd.engine.config import ModelConfig

    tensors = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name, shape in mtp_weight_shapes(ModelConfig.from_pretrained(dst)).items():
        tensors[name] = (0.1 * torch.randn(shape, generator=g) if len(shape) == 1
                         else torch.randn(shape, generator=g) / shape[-1] ** 0.5)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("variant", ["text", "every2nd", "conv5_tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_checkpoints_with_an_added_head(hf_checkpoint, tmp_path, monkeypatch, variant, dtype):
    """Other shapes (attention every 2nd layer, conv kernel 5, tied embeddings), bf16 too, over 3 attention tiles
    of context: identical to plain decoding with the head's drafts and with mostly-right ones."""
    path = _with_head(hf_checkpoint(variant), tmp_path / "ckpt")
    eng = Engine(path, dtype=dtype)
    head = _head(eng, path)
    prompt = torch.randint(1, eng.config.vocab_size, (700,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = generate(eng, prompt, params, chunk_size=512)
    assert generate_speculative(eng, head, prompt, params, 3).token_ids == ref.token_ids
    _oracle_drafts(monkeypatch, prompt + ref.token_ids)
    got = generate_speculative(eng, head, prompt, params, 3)
    assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs) and got.accepted_tokens > 0
