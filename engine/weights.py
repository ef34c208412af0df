"""Loading a Qwen3.5/3.6 checkpoint's text weights from safetensors, and the model fingerprint."""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.engine_config import QUANTIZE
from qwenpd.engine.linear import Int8Weight, cat
from qwenpd.engine.weight_layout import (MTP, WeightError, expected_weight_shapes, mtp_weight_shapes,
                                          safetensors_header, weight_files)

_PREFIXES = ("model.language_model.", "model.")
_SKIPPED = ("model.visual.", "visual.", "mtp.", "model.mtp.")
_SAMPLE_WINDOWS, _WINDOW_BYTES = 16, 4096

DRAFT_HEAD = MTP + "draft_lm_head.weight"  # not a checkpoint tensor: load_mtp_weights' draft_rows
DRAFT_EMBED = MTP + "draft_embed_tokens.weight"  # not a checkpoint tensor: load_mtp_weights' own_vocab


def load_mtp_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                     draft_rows: int | None = None, own_vocab: bool = False) -> dict[str, torch.Tensor]:
    """The MTP head's tensors (`mtp.*` or `model.mtp.*`), names under `mtp.`, cast to `dtype`; WeightError naming
    what is missing or misshaped (a checkpoint without the head, or a config without mtp_num_hidden_layers).
    `draft_rows` (the tokenizer's size, when well below the vocabulary: an embedding padded far past it) also reads
    the first draft_rows rows of the lm_head as DRAFT_HEAD: drafts never pick a padding row, so they need no
    logits for them (all rows: the head's own copy, for an int8 head over a model whose lm_head is not int8).
    `own_vocab` (the leader of a tensor-parallel group, whose embedding and lm_head are one vocabulary slice each)
    also reads the whole embedding as DRAFT_EMBED and the lm_head's rows (all, or draft_rows) as DRAFT_HEAD, so
    the head runs on that rank alone, without collectives."""
    expected = mtp_weight_shapes(config)
    if not expected:
        raise WeightError("config.json has no mtp_num_hidden_layers: this checkpoint declares no MTP head (mtp.*)")
    rows = draft_rows if draft_rows is not None and draft_rows <= config.vocab_size else None
    if own_vocab and rows is None:
        rows = config.vocab_size
    head = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    found: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                canon = name[len("model."):] if name.startswith("model." + MTP) else name
                if canon in expected:
                    t = f.get_tensor(name)
                    if tuple(t.shape) != expected[canon]:
                        raise WeightError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {expected[canon]}")
                    found[canon] = t
                    continue
                base = _canonical(name)
                if own_vocab and base == "embed_tokens.weight":
                    found[DRAFT_EMBED] = f.get_tensor(name)
                    if base == head and rows == config.vocab_size:  # tied, every row: one tensor for both
                        continue
                if rows is not None and base == head:  # the draft head's rows, in the same pass
                    found[DRAFT_HEAD] = f.get_slice(name)[:rows]
    missing = sorted(set(expected) - set(found))
    if missing:
        raise WeightError(f"checkpoint {model_dir} has no MTP head: it lacks {len(missing)} of the "
                          f"{len(expected)} mtp.* tensors, e.g. {missing[:3]}")
    if own_vocab and DRAFT_EMBED not in found:
        raise WeightError(f"checkpoint {model_dir} has no embed_tokens.weight")
    if rows is not None and DRAFT_HEAD not in found and head == "embed_tokens.weight" and own_vocab:
        found[DRAFT_HEAD] = found[DRAFT_EMBED]  # tied embeddings, all rows: the same tensor
    if rows is not None and DRAFT_HEAD not in found:
        raise WeightError(f"checkpoint {model_dir} has no {head}")
    if any(t.dtype in _FP8 for t in found.values()):
        raise WeightError("the MTP head is stored as FP8: not supported yet")
    cast: dict[int, torch.Tensor] = {}  # a tensor shared by two names stays one
    return {name: cast.setdefault(id(t), t.to(dtype)) for name, t in found.items()}


def _canonical(name: str) -> str | None:
    """Strip the text-model prefix; None for tensors qwenpd does not use (vision tower, MTP head)."""
    if name.startswith(_SKIPPED):
        return None
    if name == "lm_head.weight":
        return name
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def _content_digest(h: "hashlib._Hash", raw: memoryview) -> None:
    """Digest of a tensor's stored bytes: all of a small tensor, evenly spaced windows of a large one."""
    n = len(raw)
    if n <= _SAMPLE_WINDOWS * _WINDOW_BYTES * 4:
        h.update(raw)
        return
    step = (n - _WINDOW_BYTES) // (_SAMPLE_WINDOWS - 1)
    for i in range(_SAMPLE_WINDOWS):
        h.update(raw[i * step: i * step + _WINDOW_BYTES])


def _stored_bytes(path: Path) -> dict[str, memoryview]:
    """Each tensor's stored bytes as a view of the mapped file. Reading a view reads only the pages it touches; the
    mapping goes with the views."""
    entries, base = safetensors_header(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    return {name: view[base + entry["data_offsets"][0]: base + entry["data_offsets"][1]]
            for name, entry in entries.items()}


def _read(f, name: str, ranges: Callable[[str], list | None] | None, canon: str) -> torch.Tensor:
    """The whole stored tensor, or only the slices `ranges(canon)` names (concatenated along their dim)."""
    wanted = None if ranges is None else ranges(canon)
    return f.get_tensor(name) if wanted is None else _take(f.get_slice(name), wanted)


def _take(source: Any, wanted: list) -> torch.Tensor:
    """The slices `wanted` ((dim, start, stop), ...) of `source` (a tensor, or a safetensors slice that reads only
    them), concatenated along their dim."""
    pieces = [source[(slice(None),) * dim + (slice(start, stop),)] for dim, start, stop in wanted]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=wanted[0][0])


SCALE_SUFFIX = ".weight_scale_inv"
_FP8 = (torch.float8_e4m3fn,)


def fp8_block_size(model_dir: Path) -> tuple[int, int] | None:
    """The block size of a fine-grained FP8 checkpoint (config.json's quantization_config), None without one;
    WeightError naming the field for a quantization this loader does not implement."""
    raw = json.loads((model_dir / "config.json").read_text())
    q = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise WeightError(f"quantization_config.quant_method {method!r} is not supported (only fine-grained 'fp8')")
    if q.get("fmt", "e4m3") != "e4m3":
        raise WeightError(f"quantization_config.fmt {q.get('fmt')!r} is not supported (only 'e4m3')")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise WeightError(f"quantization_config.activation_scheme {q.get('activation_scheme')!r} is not supported "
                          "(only 'dynamic')")
    size = q.get("weight_block_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
        raise WeightError(f"quantization_config.weight_block_size {size!r} must be two positive integers")
    return size[0], size[1]


def dequantize_fp8(name: str, q: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] | None
                   ) -> torch.Tensor:
    """W = q * scale per block (fp32): the fine-grained FP8 format (one fp32 scale per block of the
    [out, in] weight, ragged edge blocks included)."""
    if block is None:
        raise WeightError(f"tensor {name!r} is stored as FP8 but config.json has no quantization_config")
    if scale is None:
        raise WeightError(f"tensor {name!r} is stored as FP8 without its {name[:-len('.weight')]}{SCALE_SUFFIX}")
    rows, cols = q.shape[0], q.shape[-1]
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if q.ndim != 2 or tuple(scale.shape) != want or not scale.is_floating_point():
        raise WeightError(f"the block scales of {name!r} have shape {tuple(scale.shape)}, expected {want} "
                          f"(blocks of {block[0]}x{block[1]})")
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_PROJECTIONS = _MLP + ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.o_proj.weight", "linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight",
                       "linear_attn.out_proj.weight")
# int8 (our CPU decode format, not a published one) also takes the DeltaNet decay/write-strength rows (fused into
# in_proj with the rest: one int8 matmul) and the lm_head (a quarter of the bytes a decode step of small reads)
_INT8_EXTRA = ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantized_names(names, mode: str | None) -> set[str]:
    """The weights `--quantize mode` quantizes: every decoder projection for fp8 (not the embedding, the lm_head,
    norms, the conv, or the DeltaNet decay/write-strength rows, which the published FP8 checkpoint keeps too), the
    MLP's only for fp8-mlp; for int8 those of fp8, the decay/write-strength rows and the lm_head (a tied one gets
    its own int8 copy at load: load_weights)."""
    if mode is None:
        return set()
    if mode not in QUANTIZE:
        raise WeightError(f"quantize must be one of {QUANTIZE}, got {mode!r}")
    kinds = _MLP if mode == "fp8-mlp" else _PROJECTIONS + (_INT8_EXTRA if mode == "int8" else ())
    return {n for n in names
            if (n.startswith("layers.") and n.endswith(kinds)) or (mode == "int8" and n == "lm_head.weight")}


def fp8_quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The published fine-grained FP8 recipe: per block (ragged edges included) scale = block amax / 448 (fp32),
    q = W / scale in float8_e4m3fn. Returns (q, scale [row blocks, col blocks]): what a checkpoint stores as
    `weight` and `weight_scale_inv`."""
    rows, cols = w.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    wf = _pad2(w.float(), br * block[0] - rows, bc * block[1] - cols)
    blocks = wf.reshape(br, block[0], bc, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(br * block[0], bc * block[1])[:rows, :cols].contiguous(), scale


def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols, 0, rows)) if rows or cols else t


def int8_quantize(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8, symmetric per output channel: scale = row amax / 127 rounded to `scale_dtype` (the model
    dtype, which the kernel multiplies by), q = round(W / scale) in [-127, 127]. Returns (q, scale as fp32)."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for start in range(0, w.shape[0], 4096):  # rows at a time: no fp32 copy of a whole lm_head (5 GB on the 27B)
        wf = w[start:start + 4096].float()
        amax = wf.abs().amax(dim=1)
        s = (amax / 127.0).to(scale_dtype).float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # a zero row, or one whose scale underflows the dtype
        q[start:start + 4096] = torch.round(wf / s[:, None]).clamp(-127, 127)
        scale[start:start + 4096] = s
    return q, scale


def quantize_dequantize(name: str, w: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """W as `mode` stores it (int8: scales in `dtype`), back in fp32: what it stands for."""
    if mode == "int8":
        q, scale = int8_quantize(w, dtype)
        return q.float() * scale[:, None]
    q, scale = fp8_quantize(w)
    return dequantize_fp8(name, q, scale, (128, 128))


def _rows(ranges: Callable[[str], list | None] | None, name: str) -> bool:
    """Whether a rank's slices of `name` are whole rows (or all of it)."""
    wanted = None if ranges is None else ranges(name)
    return wanted is None or all(dim == 0 for dim, _, _ in wanted)


def _slices(t: torch.Tensor | Int8Weight, ranges: Callable[[str], list | None] | None, name: str
            ) -> torch.Tensor | Int8Weight:
    """This rank's slices of a whole tensor or Int8Weight (`ranges` as in load_weights)."""
    wanted = None if ranges is None else ranges(name)
    if wanted is None:
        return t
    if isinstance(t, Int8Weight):
        return cat([t[(slice(None),) * dim + (slice(start, stop),)] for dim, start, stop in wanted], wanted[0][0])
    return _take(t, wanted)


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                 ranges: Callable[[str], list | None] | None = None, quantize: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], str]:
    """Read every expected tensor (checked for presence and shape), cast to `dtype`.

    `ranges(name)` (a tensor-parallel rank's `ShardPlan.weight_ranges`) reads only those slices of each tensor:
    a rank never holds, or reads from disk, more than its share. Returns (canonical name -> tensor,
    fingerprint). The fingerprint covers the config, every tensor's name/shape/stored dtype and a digest of its
    stored bytes (read from the file, so every rank computes the same one), so state from another model is
    refused later.

    `quantize` ("fp8", "fp8-mlp", "int8"; quantized_names says which weights) rounds each such weight, whole, to
    that format (fp8: 128x128 blocks, scale = block amax / 448, exactly the published FP8 recipe, so a bf16
    checkpoint quantized here computes what its FP8 checkpoint computes; int8: per output channel), and only then
    takes a rank's slices: a shard boundary that cuts a block keeps the block's scale. FP8 weights come back
    dequantized to `dtype` (what the engine multiplies by on CPU: memory as bf16); int8 weights stay int8, as
    engine/linear.py Int8Weight (q and one scale per output row in `dtype`). The fingerprint records the
    quantization.
    """
    model_dir = Path(model_dir)
    expected = expected_weight_shapes(config)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    to_quantize = quantized_names(expected, quantize)
    block = fp8_block_size(model_dir)
    found: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}  # weight name -> its FP8 block scales
    read_whole: set[str] = set()  # read whole, to be sliced after dequantizing or quantizing
    headers: dict[str, tuple[tuple[int, ...], str, memoryview]] = {}
    for path in weight_files(model_dir):
        try:
            spans = _stored_bytes(path)
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    canon = _canonical(name)
                    if canon is not None and canon.endswith(SCALE_SUFFIX):
                        weight = canon[: -len(SCALE_SUFFIX)] + ".weight"
                        if weight in expected:
                            scales[weight] = f.get_tensor(name)
                        continue
                    if canon is None or canon not in expected:
                        continue
                    if canon in found:
                        raise WeightError(f"tensor {canon!r} appears twice (second copy as {name!r} in {path.name})")
                    sliced = f.get_slice(name)
                    shape = tuple(sliced.get_shape())
                    if shape != expected[canon]:
                        raise WeightError(f"tensor {canon!r} has shape {shape}, expected {expected[canon]}")
                    fp8 = sliced.get_dtype().startswith("F8")
                    # FP8 and quantized: whole, sliced after; int8's per-row scales need whole rows only
                    whole = fp8 or (canon in to_quantize and not (quantize == "int8" and _rows(ranges, canon)))
                    if whole:
                        read_whole.add(canon)
                    found[canon] = f.get_tensor(name) if whole else _read(f, name, ranges, canon)
                    headers[canon] = (shape, found[canon].dtype, spans[name])
        except WeightError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise WeightError(f"cannot read {path}: {e}") from e
    missing = sorted(set(expected) - set(found))
    if missing:
        raise WeightError(f"checkpoint {model_dir} lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    scale_digests: dict[str, str] = {}
    for name, t in found.items():  # FP8 weights: dequantized with their block scales, then this rank's slices
        if t.dtype in _FP8:
            scale = scales.pop(name, None)
            if scale is not None:
                scale_digests[name] = hashlib.sha256(scale.float().numpy().tobytes()).hexdigest()
            found[name] = dequantize_fp8(name, t, scale, block)
            if name not in to_quantize:
                found[name] = _slices(found[name], ranges, name)
    for name in to_quantize:  # --quantize: whole weights rounded to the format, then this rank's slices
        if quantize == "int8":  # a weight read as this rank's rows alone: quantized as they are
            q = Int8Weight(*int8_quantize(found[name], dtype))
            found[name] = _slices(q, ranges, name) if name in read_whole else q
        else:
            found[name] = _slices(quantize_dequantize(name, found[name], quantize), ranges, name)
    tied_int8 = quantize == "int8" and config.tie_word_embeddings
    if tied_int8:  # the lm_head its own int8 copy of the embedding rows (per-row scales: the rank's slice alone)
        found["lm_head.weight"] = Int8Weight(*int8_quantize(found["embed_tokens.weight"], dtype))
    if scales:
        raise WeightError(f"tensor {sorted(scales)[0]!r} has block scales but is not stored as FP8")
    h = hashlib.sha256(json.dumps(config.fingerprint_dict(), sort_keys=True).encode())
    if quantize is not None:  # prefill and decode that compute differently refuse each other's hand-offs
        h.update(f"quantize {quantize};".encode())
    weights: dict[str, torch.Tensor] = {}
    if tied_int8:
        weights["lm_head.weight"] = found["lm_head.weight"].to(dtype)
    for name in sorted(expected):
        t = found[name]
        shape, stored, raw = headers[name]
        if not isinstance(t, Int8Weight) and not t.is_floating_point():
            raise WeightError(f"tensor {name!r} has non-float dtype {t.dtype}")
        h.update(f"{name}:{shape}:{stored};".encode())
        _content_digest(h, raw)
        if stored in _FP8:  # what the stored bytes mean: the block size and the scales
            h.update(f"fp8 block {block} scales {scale_digests[name]};".encode())
        weights[name] = t.to(dtype)
    return weights, h.hexdigest()
