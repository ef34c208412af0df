"""The vision tower of Qwen3.5/3.6 (`model.visual.*`), as transformers' Qwen3_5VisionModel computes it.

pixel rows [N, C*T*P*P] (engine/media.py: resized, normalised, cut into patches in spatial-merge-block order)
  -> patch embedding (a Conv3d whose kernel equals its stride: one matmul per patch)
  -> + the learned position grid, resampled bilinearly (align_corners) to each image's patch grid
  -> `depth` pre-norm ViT blocks: LayerNorm -> attention with 2-D rotary (h, w) over each frame's patches
     (non-causal; frames and images never attend to each other) -> LayerNorm -> GELU(tanh) MLP
  -> merger: LayerNorm, then each merge x merge block of patches concatenated -> Linear -> GELU -> Linear
  -> [N / merge^2, text hidden]: the embeddings that replace the image's <|image_pad|> tokens.

Qwen3.5's language model takes these embeddings and nothing else from the tower (no deepstack injections, unlike
Qwen3-VL). The tower runs in the model dtype with a bf16/fp32 residual exactly as transformers' does (LayerNorm,
Linear and SDPA on the same dtypes), so its output equals the oracle's.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open

from qwenpd.engine.config import VisionConfig
from qwenpd.engine.mrope import VisionSpan, rope_positions
from qwenpd.engine.weight_layout import weight_files  # the checkpoint's safetensors files, one rule for all

VISUAL_PREFIXES = ("model.visual.", "visual.")
Grid = tuple[int, int, int]  # (t, h, w) in patches: what transformers calls grid_thw


class VisionWeightError(ValueError):
    """A checkpoint whose vision tower does not match its vision_config."""


def vision_weight_shapes(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Name (under `visual.`) -> shape of every tensor of the tower transformers would load."""
    e, i, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "patch_embed.proj.bias": (e,),
        "pos_embed.weight": (v.num_position_embeddings, e),
        "merger.norm.weight": (e,), "merger.norm.bias": (e,),
        "merger.linear_fc1.weight": (e * m2, e * m2), "merger.linear_fc1.bias": (e * m2,),
        "merger.linear_fc2.weight": (v.out_hidden_size, e * m2), "merger.linear_fc2.bias": (v.out_hidden_size,),
    }
    for b in range(v.depth):
        p = f"blocks.{b}."
        shapes.update({p + "norm1.weight": (e,), p + "norm1.bias": (e,), p + "norm2.weight": (e,),
                       p + "norm2.bias": (e,), p + "attn.qkv.weight": (3 * e, e), p + "attn.qkv.bias": (3 * e,),
                       p + "attn.proj.weight": (e, e), p + "attn.proj.bias": (e,),
                       p + "mlp.linear_fc1.weight": (i, e), p + "mlp.linear_fc1.bias": (i,),
                       p + "mlp.linear_fc2.weight": (e, i), p + "mlp.linear_fc2.bias": (e,)})
    return shapes


def load_vision_weights(model_dir: str | Path, v: VisionConfig, dtype: torch.dtype
                        ) -> tuple[dict[str, torch.Tensor], str]:
    """The tower's tensors (stored under `model.visual.` or `visual.`), cast to `dtype`, and a digest of what was
    read (names, shapes and bytes: it joins the model fingerprint, since the tower decides the state an image
    prompt leaves). VisionWeightError naming what is missing or misshaped."""
    expected = vision_weight_shapes(v)
    found: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                prefix = next((p for p in VISUAL_PREFIXES if name.startswith(p)), None)
                if prefix is None or name[len(prefix):] not in expected:
                    continue
                canon = name[len(prefix):]
                t = f.get_tensor(name)
                if tuple(t.shape) != expected[canon]:
                    raise VisionWeightError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {expected[canon]}")
                if not t.is_floating_point() or t.element_size() == 1:
                    raise VisionWeightError(f"tensor {name!r} is stored as {t.dtype}: the vision tower needs "
                                            "bf16/fp16/fp32 weights")
                found[canon] = t
    missing = sorted(set(expected) - set(found))
    if missing:
        raise VisionWeightError(f"checkpoint {model_dir} lacks {len(missing)} vision tower tensor(s) "
                                f"(model.visual.*), e.g. {missing[:3]}")
    h = hashlib.sha256()
    for name in sorted(found):
        t = found[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() < (1 << 20)
                 else t.flatten()[:: max(1, t.numel() // 4096)].contiguous().view(torch.uint8).numpy().tobytes())
    return {name: t.to(dtype) for name, t in found.items()}, h.hexdigest()


def merge_order_positions(grid: Grid, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) [t*h*w] of every patch of a (t, h, w) grid in the order the processor lays patches out: merge x
    merge blocks in raster order, raster order inside each block, frames one after another."""
    t, h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w).reshape(h // merge, merge, w // merge, merge)
    cols = torch.arange(w)[None, :].expand(h, w).reshape(h // merge, merge, w // merge, merge)
    rows = rows.transpose(1, 2).flatten().repeat(t)
    cols = cols.transpose(1, 2).flatten().repeat(t)
    return rows, cols


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (2) and weights on one axis, align_corners=True: target index i of `size` maps to source
    i * (side-1) / (size-1) of a `side`-long table; out-of-range taps are clamped to the border."""
    src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def position_taps(grids: Sequence[Grid], side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [N, 4] into the flattened side x side learned position table, and weights [N, 4] (fp32), that
    resample it bilinearly to each grid (the tower's `pos_embed` interpolation), patches in merge order."""
    all_idx, all_w = [], []
    for grid in grids:
        rows, cols = merge_order_positions(grid, merge)
        h_taps, h_w = _axis_taps(rows, grid[1], side)
        w_taps, w_w = _axis_taps(cols, grid[2], side)
        all_idx.append((h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4))
        all_w.append((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4))
    return torch.cat(all_idx), torch.cat(all_w)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionTower:
    """The loaded tower (weights from load_vision_weights); `encode` runs it."""

    def __init__(self, v: VisionConfig, weights: dict[str, torch.Tensor], device: torch.device):
        self.v = v
        self.w = {name: t.to(device) for name, t in weights.items()}
        self.device = device
        self.dtype = self.w["patch_embed.proj.weight"].dtype
        self.side = int(math.isqrt(v.num_position_embeddings))
        spatial = v.head_dim // 2
        self.inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=device)
                                                / spatial))
        self.gelu = "tanh" if v.hidden_act == "gelu_pytorch_tanh" else "none"

    def tokens_of(self, grid: Grid) -> int:
        """Language-model tokens (merged patches) one image or video of this patch grid becomes."""
        return grid[0] * grid[1] * grid[2] // self.v.spatial_merge_size ** 2

    def _rotary(self, grids: Sequence[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] fp32: half the frequencies turn with the patch row, half with its column."""
        pos = [torch.stack(merge_order_positions(g, self.v.spatial_merge_size), dim=-1) for g in grids]
        freqs = torch.cat(pos).to(self.device)[..., None].float() * self.inv_freq  # [N, 2, hd/4]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat([cos[:, 0], cos[:, 1]], dim=-1)
        sin = torch.cat([sin[:, 0], sin[:, 1]], dim=-1)
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def _attention(self, x: torch.Tensor, p: str, lengths: list[int], cos: torch.Tensor, sin: torch.Tensor
                   ) -> torch.Tensor:
        n, heads = x.shape[0], self.v.num_heads
        qkv = F.linear(x, self.w[p + "qkv.weight"], self.w[p + "qkv.bias"])
        q, k, v = qkv.reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, heads, D] each
        c, s = cos[:, None, :], sin[:, None, :]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(x.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, D]
        scale = self.v.head_dim ** -0.5
        outs = [F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2)
                for qs, ks, vs in zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)))]
        o = torch.cat(outs, dim=1).reshape(n, -1)
        return F.linear(o, self.w[p + "proj.weight"], self.w[p + "proj.bias"])

    def _layer_norm(self, x: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[p + ".weight"], self.w[p + ".bias"], 1e-6)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """pixels [N, patch_dim] (fp32 rows of every image/video in `grids` order, N = sum t*h*w) -> one tensor
        [t*h*w / merge^2, text hidden] (model dtype) per grid."""
        v = self.v
        total = sum(t * h * w for t, h, w in grids)
        if pixels.shape != (total, v.patch_dim):
            raise ValueError(f"pixels {tuple(pixels.shape)} do not match grids {list(grids)}: expected "
                             f"[{total}, {v.patch_dim}]")
        x = pixels.to(self.device, self.dtype).view(-1, v.in_channels, v.temporal_patch_size, v.patch_size,
                                                     v.patch_size)
        stride = (v.temporal_patch_size, v.patch_size, v.patch_size)
        x = F.conv3d(x, self.w["patch_embed.proj.weight"], self.w["patch_embed.proj.bias"], stride=stride)
        x = x.view(-1, v.hidden_size)
        idx, wts = position_taps(grids, self.side, v.spatial_merge_size)
        pos = (self.w["pos_embed.weight"][idx.to(self.device)] * wts.to(self.device)[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        cos, sin = self._rotary(grids)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # each frame attends within itself
        for b in range(v.depth):
            p = f"blocks.{b}."
            x = x + self._attention(self._layer_norm(x, p + "norm1"), p + "attn.", lengths, cos, sin)
            hidden = F.linear(self._layer_norm(x, p + "norm2"), self.w[p + "mlp.linear_fc1.weight"],
                              self.w[p + "mlp.linear_fc1.bias"])
            x = x + F.linear(F.gelu(hidden, approximate=self.gelu), self.w[p + "mlp.linear_fc2.weight"],
                             self.w[p + "mlp.linear_fc2.bias"])
        m = self._layer_norm(x, "merger.norm").view(-1, v.hidden_size * v.spatial_merge_size ** 2)
        m = F.gelu(F.linear(m, self.w["merger.linear_fc1.weight"], self.w["merger.linear_fc1.bias"]))
        m = F.linear(m, self.w["merger.linear_fc2.weight"], self.w["merger.linear_fc2.bias"])
        return list(torch.split(m, [self.tokens_of(g) for g in grids]))


class PromptMedia:
    """The images of one prompt as the language model takes them: each image's embeddings (from `start`, the
    index of its first placeholder token) and every token's mRoPE positions with the delta after the prompt
    (engine/mrope.py). `chunk(lo, hi)` is what prefill chunk [lo, hi) adds to its token ids."""

    def __init__(self, num_tokens: int, spans: list[VisionSpan], embeds: list[torch.Tensor]):
        if len(spans) != len(embeds) or any(s.length != e.shape[0] for s, e in zip(spans, embeds)):
            raise ValueError("each vision span needs embeddings of its length")
        self.spans = list(spans)
        self.embeds = list(embeds)
        positions, self.delta = rope_positions(num_tokens, self.spans)  # ValueError on misplaced spans
        self.rope = torch.tensor(positions, dtype=torch.long)  # [T, 3], host
        self._highest = self.rope.amax(1).cummax(0).values  # [T]: the largest position among tokens 0..i

    @classmethod
    def of_items(cls, num_tokens: int, spans: Sequence[VisionSpan], owners: Sequence[tuple[int, int]],
                 embeds: dict[int, torch.Tensor | None], stand_in: torch.Tensor | None = None) -> "PromptMedia":
        """From each item's embeddings (`embeds[n]`; a video's temporal patches one after another) and the spans
        engine/media.py place gave (owners: (item, temporal patch) per span). An item whose embeddings are None
        gets `stand_in` [1, H] broadcast over its rows (rows prefill never reads: before a restored prefix)."""
        per_span = []
        for s, (n, frame) in zip(spans, owners):
            e = embeds.get(n)
            per_span.append(e[frame * s.length:(frame + 1) * s.length] if e is not None
                            else stand_in.expand(s.length, stand_in.shape[-1]))
        return cls(num_tokens, list(spans), per_span)

    def delta_at(self, n: int) -> int:
        """The rope delta after the first n tokens (what text following them would add to its index)."""
        return self.delta if n == self.rope.shape[0] else int(self._highest[n - 1]) + 1 - n

    def chunk(self, lo: int, hi: int, device: torch.device):
        """ChunkMedia for prompt tokens [lo, hi): their positions, and the embedding rows that fall inside."""
        from qwenpd.engine.runner import ChunkMedia

        rows, values = [], []
        for span, e in zip(self.spans, self.embeds):
            a, b = max(lo, span.start), min(hi, span.end)
            if a < b:
                rows.append(torch.arange(a - lo, b - lo))
                values.append(e[a - span.start: b - span.start])
        embeds = None if not rows else (torch.cat(rows).to(device), torch.cat(values).to(device))
        return ChunkMedia(self.rope[lo:hi].to(device), embeds)


def prompt_media(ids: Sequence[int], items: Sequence, embeds: Sequence[torch.Tensor], vision: VisionConfig,
                 encode_text=None) -> tuple[list[int], PromptMedia]:
    """A tokenized prompt with one placeholder per media item (engine/media.py place) and each item's
    embeddings (VisionTower.encode, or an encoder cache) -> (the prompt's token ids, its PromptMedia)."""
    from qwenpd.engine.media import place

    out, spans, owners = place(ids, items, vision, encode_text)
    return out, PromptMedia.of_items(len(out), spans, owners, dict(enumerate(embeds)))


def vision_fingerprint(v: VisionConfig, dtype: torch.dtype, digest: str) -> str:
    """What stored embeddings are checked against: the tower's config, compute dtype and weights (an encoder
    instance and a prefill instance of the same checkpoint compute the same one)."""
    import dataclasses
    import json

    spec = json.dumps({**dataclasses.asdict(v), "dtype": str(dtype)}, sort_keys=True)
    return hashlib.sha256(f"vision {spec} {digest}".encode()).hexdigest()


class VisionModel:
    """The vision tower alone, as an encoder instance loads it (no language model): `config`, `model_dir`,
    `fingerprint` (vision_fingerprint) and `encode_images`, as an Engine has them."""

    def __init__(self, model_dir: str, dtype: str = "auto", device: str = "cpu"):
        from qwenpd.engine.config import ModelConfig
        from qwenpd.engine.engine import DTYPES

        self.model_dir = str(model_dir)
        self.config = ModelConfig.from_pretrained(model_dir)
        if self.config.vision is None:
            raise ValueError(f"checkpoint {model_dir} has no vision tower (no vision_config)")
        name = self.config.torch_dtype if dtype == "auto" else dtype
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not supported; pass float32 or bfloat16")
        self.dtype = DTYPES[name]
        self.device = torch.device(device)
        weights, digest = load_vision_weights(model_dir, self.config.vision, self.dtype)
        self.tower = VisionTower(self.config.vision, weights, self.device)
        self.fingerprint = vision_fingerprint(self.config.vision, self.dtype, digest)

    def encode_images(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        return self.tower.encode(pixels, grids)
