"""`qwenpd init-model`: a complete HF-format checkpoint with deterministic random weights and a real tokenizer.

No downloads: the tokenizer is a byte-level BPE trained on a short embedded text, so every machine (CI included)
builds the same files from the same seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenpd.engine.config import ModelConfig, preset
from qwenpd.engine.weights import expected_weight_shapes

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

_CORPUS = """\
qwenpd serves hybrid language models. A prefill service encodes the prompt in chunks and hands the whole model
state to a decode service, which generates tokens for many requests at once. The state holds the keys and values
of the attention layers and the recurrent and convolution state of the linear attention layers.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time there was a small model that wanted to answer every question. It read the question, thought
about the answer, and wrote it down one token at a time. Hello, world! How are you today? I am fine, thank you.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
The numbers are 0 1 2 3 4 5 6 7 8 9 10 100 1000. Tokens, tensors, caches, checkpoints, and streams.
"""


def build_tokenizer(vocab_size: int):
    """Byte-level BPE with Qwen-style special tokens; deterministic for a given vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def random_weights(c: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights scaled so activations stay O(1) and logits are well separated (no near-ties in tests)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in sorted(expected_weight_shapes(c).items()):
        if name.endswith("A_log"):
            t = torch.empty(shape).uniform_(0.05, 1.0, generator=g).log()
        elif name.endswith("dt_bias"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("linear_attn.norm.weight"):  # standard-weight gated norm
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("norm.weight"):  # zero-centred norms: scale is (1 + w)
            t = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("conv1d.weight"):
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        elif name == "embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:  # [out, in] projections
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out[name] = t
    return out


def init_model(out_dir: str | Path, config: ModelConfig | str = "tiny", seed: int = 0,
               dtype: str | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json."""
    c = preset(config) if isinstance(config, str) else config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(min(c.vocab_size, 4096))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    c = c.replace(eos_token_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]), pad_token_id=ids["<|endoftext|>"],
                  torch_dtype=dtype or c.torch_dtype)
    store = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.torch_dtype]
    weights = random_weights(c, seed)
    tensors = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.to(store).contiguous()
               for k, v in weights.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": c.max_position_embeddings, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": list(c.eos_token_ids), "pad_token_id": c.pad_token_id, "do_sample": False}, indent=2) + "\n")
    return out
