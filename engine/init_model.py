"""`qwenpd init-model`: a complete HF-format checkpoint with deterministic random weights and a real tokenizer.

No downloads: the tokenizer is a byte-level BPE trained on a short embedded text, so every machine (CI included)
builds the same files from the same seed.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qwenpd.engine.config import ModelConfig, preset
from qwenpd.engine.weight_layout import MTP, expected_weight_shapes, mtp_weight_shapes

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The Qwen3.6 chat format: tools offered in the system turn, calls as <tool_call><function=...><parameter=...>,
# tool results as <tool_response> in a user turn, reasoning opened by the generation prompt when enable_thinking
# is true and closed empty when it is false (left to the model when not given).
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' -}}{%- endif -%}"
    "{{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "</function>\n</tool_call><|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and tools and loop.first -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- if message['content'] or not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{{- '<tool_call>\n<function=' + call['function']['name'] + '>\n' -}}"
    "{%- for key, value in (call['function']['arguments'] or {}).items() -%}"
    "{{- '<parameter=' + key + '>\n' + (value if value is string else (value | tojson)) + '\n</parameter>\n' -}}"
    "{%- endfor -%}"
    "{{- '</function>\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}"
    "{%- elif enable_thinking is defined and enable_thinking is true -%}{{- '<think>\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Qwen3.5/3.6's vision tokens: an image is <|vision_start|><|image_pad|><|vision_end|> in a rendered chat, its pad
# token repeated once per merged patch when the prompt is tokenized (engine/media.py).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# CHAT_TEMPLATE for messages whose content is a list of parts (text, image, video), as Qwen3.6's template takes them
VISION_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] -}}",
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}")

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


def build_tokenizer(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """Byte-level BPE with Qwen-style special tokens; deterministic for a given vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


# What init-model draws at a time (fp32 elements: 64 MiB). A checkpoint of any size is written block by block
# straight into its file, so memory stays at one block whatever the model (a 4-layer 27B is 8 GB in bf16).
_BLOCK_ELEMENTS = 1 << 24
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _row_blocks(shape: tuple[int, ...], max_elements: int) -> list[tuple[int, int]]:
    """[start, stop) row blocks of a tensor drawn piecewise. Every block but the last holds a multiple of 16
    elements and the last at least 16 (unless the whole tensor has fewer), so the blocks' draws equal one draw of
    the whole tensor: torch's CPU normal sampler works in groups of 16 and redraws a ragged tail of 16
    (tests/engine/test_init_model.py checks it)."""
    rows, per_row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    step = max(16, max_elements // per_row // 16 * 16)
    blocks = [(i, min(i + step, rows)) for i in range(0, rows, step)]
    if len(blocks) > 1 and (blocks[-1][1] - blocks[-1][0]) * per_row < 16:
        blocks[-2:] = [(blocks[-2][0], rows)]
    return blocks


def _draw(name: str, shape: tuple[int, ...], rows: int, g: torch.Generator) -> torch.Tensor:
    """`rows` rows of weight `name` (full shape `shape`), fp32, scaled so activations stay O(1) and logits are well
    separated (no near-ties in tests)."""
    block = (rows, *shape[1:])
    if name.endswith("A_log"):
        return torch.empty(block).uniform_(0.05, 1.0, generator=g).log()
    if name.endswith(("dt_bias", "linear_attn.norm.weight")):  # standard-weight gated norm
        return 1.0 + 0.1 * torch.randn(block, generator=g)
    if name.endswith("norm.weight"):  # zero-centred norms: scale is (1 + w)
        return 0.1 * torch.randn(block, generator=g)
    if name == "embed_tokens.weight":
        return torch.randn(block, generator=g)
    return torch.randn(block, generator=g) / math.sqrt(shape[-1])  # [out, in] projections and the conv


def _weight_blocks(c: ModelConfig, seed: int, dtype: torch.dtype, max_elements: int = _BLOCK_ELEMENTS
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, block of rows in `dtype`) of every weight, in sorted name order: one generator walks the
    names in that order, so a seed gives the same weights however they are cut into blocks."""
    for name, shape, g in _written(c, seed):
        for start, stop in _row_blocks(shape, max_elements):
            yield name, _draw(name, shape, stop - start, g).to(dtype).contiguous()


def _written(c: ModelConfig, seed: int) -> Iterator[tuple[str, tuple[int, ...], torch.Generator]]:
    """(name, shape, generator) of every tensor in file order: the text model's in sorted name order from one
    generator, then the MTP head's from another (so adding the head left the text model's weights as they were)."""
    g = torch.Generator().manual_seed(seed)
    for name, shape in sorted(expected_weight_shapes(c).items()):
        yield name, shape, g
    g_mtp = torch.Generator().manual_seed(seed + 0x6D7470)
    for name, shape in sorted(mtp_weight_shapes(c).items()):
        yield name, shape, g_mtp


def random_weights(c: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every weight whole, fp32 (small models; `init_model` streams instead)."""
    blocks: dict[str, list[torch.Tensor]] = {}
    for name, block in _weight_blocks(c, seed, torch.float32):
        blocks.setdefault(name, []).append(block)
    return {name: torch.cat(parts) for name, parts in blocks.items()}


def _stored_name(name: str) -> str:
    return name if name == "lm_head.weight" or name.startswith(MTP) else "model." + name


def write_weights(path: str | Path, c: ModelConfig, seed: int, dtype: torch.dtype,
                  max_elements: int = _BLOCK_ELEMENTS) -> int:
    """Write `c`'s random weights as one safetensors file, block by block (the header is known from the shapes
    alone), through a temporary file renamed at the end. Returns the bytes of tensor data."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer copies native bytes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in _written(c, 0):
        size = math.prod(shape) * itemsize
        header[_stored_name(name)] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                      "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, block in _weight_blocks(c, seed, dtype, max_elements):
            f.write(block.reshape(-1).view(torch.uint8).numpy())
        written = f.tell() - 8 - len(raw)
    if written != offset:
        raise RuntimeError(f"wrote {written} bytes of tensor data, the header promised {offset}")
    tmp.replace(path)
    return offset


def init_model(out_dir: str | Path, config: ModelConfig | str = "tiny", seed: int = 0,
               dtype: str | None = None, num_layers: int | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json.

    `num_layers` cuts the model to that many layers (a multiple of its layer group: 4 for Qwen3.5/3.6), keeping
    every other shape: the real state sizes and sharding of a model whose full depth does not fit here.
    """
    c = preset(config) if isinstance(config, str) else config
    if num_layers is not None:
        c = c.with_num_layers(num_layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(min(c.vocab_size, 4096))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    c = c.replace(eos_token_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]), pad_token_id=ids["<|endoftext|>"],
                  torch_dtype=dtype or c.torch_dtype)
    store = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.torch_dtype]
    write_weights(out / "model.safetensors", c, seed, store)
    (out / "config.json").write_text(json.dumps(c.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": c.max_position_embeddings, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": list(c.eos_token_ids), "pad_token_id": c.pad_token_id, "do_sample": False}, indent=2) + "\n")
    return out
