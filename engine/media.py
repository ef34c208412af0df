"""Images and videos as the vision tower takes them: decoded with Pillow, resized and normalised with numpy as
the checkpoint's image processor specifies (preprocessor_config.json: Qwen2-VL's `smart_resize`, min/max pixels,
patch, merge and temporal patch sizes, mean/std), and cut into patch rows in spatial-merge-block order.

The steps follow transformers' Qwen2VLImageProcessorPil (the PIL backend of the processor Qwen3.5's checkpoints
name) and Qwen3VLVideoProcessor: tests/engine/test_media.py checks the image rows equal the PIL processor's.
Video frames are given as images (already sampled; no video decoding here) and resized with Pillow's bicubic
filter; transformers resizes video with torchvision, which is not installed beside this torch build, so video rows
are checked against the specification rather than its output.

Bad input raises MediaError naming the limit or the defect, before anything large is decoded: the header's size is
checked against `max_pixels` first (a decompression bomb never reaches the decoder).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow decodes here and vision APIs commonly accept
MIME_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
                "image/gif": "GIF", "image/bmp": "BMP"}
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # Qwen3.5/3.6's preprocessor_config.json
DEFAULT_STD = (0.5, 0.5, 0.5)


class MediaError(ValueError):
    """An image or video qwenpd will not take: `limit` names the server limit it broke (None: a defect of the
    data itself: corrupt, truncated, an unsupported format)."""

    def __init__(self, message: str, limit: str | None = None):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """What one request may bring: decoded pixels per image (width x height, checked from the header before
    decoding), images per request, frames per video, bytes per encoded image."""

    max_image_pixels: int = 40_000_000
    max_images_per_request: int = 16
    max_video_frames: int = 64
    max_image_bytes: int = 20 << 20

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_images_per_request", "max_video_frames", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ProcessorSpec:
    """The image (or video) processor of a checkpoint: preprocessor_config.json's fields that decide the rows."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    rescale_factor: float = 1 / 255
    fps: float = 2.0  # video: the frame rate its frames were sampled at (for the timestamps between frames)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any], defaults: "ProcessorSpec | None" = None) -> "ProcessorSpec":
        base = defaults or cls()
        size = raw.get("size") or {}
        return cls(patch_size=int(raw.get("patch_size", base.patch_size)),
                   temporal_patch_size=int(raw.get("temporal_patch_size", base.temporal_patch_size)),
                   merge_size=int(raw.get("merge_size", base.merge_size)),
                   min_pixels=int(raw.get("min_pixels", size.get("shortest_edge", base.min_pixels))),
                   max_pixels=int(raw.get("max_pixels", size.get("longest_edge", base.max_pixels))),
                   mean=tuple(float(x) for x in raw.get("image_mean", base.mean)),
                   std=tuple(float(x) for x in raw.get("image_std", base.std)),
                   rescale_factor=float(raw.get("rescale_factor", base.rescale_factor)),
                   fps=float(raw.get("fps", base.fps)))

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, patch_size: int, temporal_patch_size: int, merge_size: int
                        ) -> tuple["ProcessorSpec", "ProcessorSpec"]:
        """(image spec, video spec) from the checkpoint's preprocessor_config.json and
        video_preprocessor_config.json; where absent, the vision config's sizes with Qwen3.5's published
        defaults (images 256x256..4096x4096 pixels; video frames 128x32x32..768x32x32 pixels in all)."""
        base = cls(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
        image = video = base
        d = Path(model_dir)
        if (d / "preprocessor_config.json").is_file():
            image = cls.from_dict(json.loads((d / "preprocessor_config.json").read_text()), base)
        video_default = cls(patch_size=image.patch_size, temporal_patch_size=image.temporal_patch_size,
                            merge_size=image.merge_size, min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32,
                            mean=image.mean, std=image.std)
        video = video_default
        if (d / "video_preprocessor_config.json").is_file():
            video = cls.from_dict(json.loads((d / "video_preprocessor_config.json").read_text()), video_default)
        return image, video


@dataclass(frozen=True, slots=True)
class Pixels:
    """One image or video as patch rows: values [t*h*w, C*T*P*P] float32, grid (t, h, w) in patches."""

    values: np.ndarray
    grid: tuple[int, int, int]
    kind: str = "image"  # or "video"
    timestamps: tuple[float, ...] = ()  # video: seconds of each temporal patch (the text between its frames)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1,
                 temporal: int = 1) -> tuple[int, int]:
    """(height, width) divisible by `factor`, with frames x height x width within [min_pixels, max_pixels], the
    aspect ratio kept as closely as possible (Qwen2-VL's rule; for video, Qwen3-VL's, which counts frames)."""
    if temporal > 1 and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over 200:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal if temporal > 1 else 1
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, limits: MediaLimits = MediaLimits(), mime: str | None = None):
    """Encoded image bytes -> an RGB PIL image. MediaError for data over max_image_bytes, an unknown or
    unsupported format (or one other than `mime` says), more than max_image_pixels (from the header, before
    decoding), or data that does not decode (corrupt, truncated)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise MediaError(f"image of {len(data)} bytes is over the limit of {limits.max_image_bytes}",
                         "max_image_bytes")
    if mime is not None and mime.lower() not in MIME_FORMATS:
        raise MediaError(f"unsupported image type {mime!r}; send one of {sorted(MIME_FORMATS)}")
    formats = [MIME_FORMATS[mime.lower()]] if mime is not None else list(FORMATS)
    try:
        img = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise MediaError(f"image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_image_pixels}",
                             "max_image_pixels")
        if w < 1 or h < 1:
            raise MediaError(f"image of {w}x{h} pixels is empty")
        img.load()  # decodes: raises on corrupt or truncated data
        return img.convert("RGB")  # as transformers' processors convert
    except MediaError:
        raise
    except UnidentifiedImageError:
        if mime is not None:
            raise MediaError(f"the data is not a {formats[0]} image, as its type {mime!r} says") from None
        raise MediaError(f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image rejected as a decompression bomb: {exc}", "max_image_pixels") from None
    except Exception as exc:  # noqa: BLE001 - crafted files raise many kinds (struct.error, IndexError, ...)
        raise MediaError(f"the image does not decode: {type(exc).__name__}: {exc}") from None


def _normalised(img, height: int, width: int, spec: ProcessorSpec) -> np.ndarray:
    """Resize (bicubic, on the uint8 image) -> rescale in float64 -> float32 -> normalise: [C, H, W] float32,
    as transformers' PIL backend does it."""
    from PIL import Image

    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.BICUBIC)
    a = np.asarray(img).transpose(2, 0, 1)
    a = (a.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return ((a - mean) / std).astype(np.float32)


def image_pixels(img, spec: ProcessorSpec) -> Pixels:
    """An RGB image -> patch rows: smart-resized, normalised, each patch repeated over the temporal patch."""
    w, h = img.size
    rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
    a = _normalised(img, rh, rw, spec)
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    c, gh, gw = a.shape[0], rh // p, rw // p
    patches = a.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, p, p)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, p, p))
    return Pixels(np.ascontiguousarray(patches.reshape(gh * gw, c * tp * p * p)), (1, gh, gw))


def video_pixels(frames: Sequence, spec: ProcessorSpec, limits: MediaLimits = MediaLimits(),
                 mime: str | None = None) -> Pixels:
    """Sampled frames (RGB images, or encoded ones decoded here one at a time, in order, at spec.fps) -> patch
    rows: every frame resized to one size chosen for the whole clip (as each is decoded: only one full-size frame
    is held at a time), the last frame repeated to a whole number of temporal patches, each temporal patch
    flattened with its frames' pixels side by side (Qwen3-VL's video processor; timestamps from the frame
    indices, the repeated frame taking the last one's)."""
    if not frames:
        raise MediaError("a video needs at least one frame")
    if len(frames) > limits.max_video_frames:
        raise MediaError(f"video of {len(frames)} frames is over the limit of {limits.max_video_frames}",
                         "max_video_frames")

    def load(frame):
        return decode_image(frame, limits, mime) if isinstance(frame, (bytes, bytearray)) else frame

    tp = spec.temporal_patch_size
    first = load(frames[0])
    w, h = first.size
    rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels, frames=len(frames), temporal=tp)
    arrays = []
    for i, frame in enumerate(frames):
        img = first if i == 0 else load(frame)
        if img.size != (w, h):
            raise MediaError("all frames of a video must have the same size")
        arrays.append(_normalised(img, rh, rw, spec))
    indices = list(range(len(frames)))
    pad = -len(frames) % tp
    arrays += [arrays[-1]] * pad
    indices += [indices[-1]] * pad
    a = np.stack(arrays)  # [F, C, H, W]
    p, m = spec.patch_size, spec.merge_size
    gt, c, gh, gw = len(arrays) // tp, a.shape[1], rh // p, rw // p
    patches = a.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    stamps = [(indices[i] / spec.fps + indices[i + tp - 1] / spec.fps) / 2 for i in range(0, len(arrays), tp)]
    return Pixels(np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw), "video",
                  tuple(stamps))


def locate(ids: Sequence[int], items: Sequence[Pixels], vision) -> tuple[list["VisionSpan"], list[tuple[int, int]]]:
    """`place`'s spans and owners in a prompt whose placeholders are already expanded (a prompt as prefill
    returned it, which a resumed request sends back). MediaError unless the runs of pad tokens are exactly the
    items' in order."""
    from qwenpd.engine.mrope import VisionSpan

    m = vision.spatial_merge_size
    wanted = []  # (kind token, run length, item, temporal patch)
    for n, item in enumerate(items):
        t, h, w = item.grid
        if item.kind == "image":
            wanted.append((vision.image_token_id, t * h * w // (m * m), n, 0, t))
        else:
            wanted += [(vision.video_token_id, h * w // (m * m), n, f, 1) for f in range(t)]
    pads = (vision.image_token_id, vision.video_token_id)
    spans, owners, i = [], [], 0
    for token, length, n, f, t in wanted:  # each item's run in order (adjacent runs are told apart by length)
        while i < len(ids) and ids[i] not in pads:
            i += 1
        if i + length > len(ids) or any(x != token for x in ids[i:i + length]):
            raise MediaError("the prompt's image/video tokens do not match its images and videos")
        grid = items[n].grid
        spans.append(VisionSpan(i, t, grid[1] // m, grid[2] // m))
        owners.append((n, f))
        i += length
    if any(x in pads for x in ids[i:]):
        raise MediaError("the prompt has more image/video tokens than its images and videos")
    return spans, owners


def place(ids: Sequence[int], items: Sequence[Pixels], vision, encode_text=None
          ) -> tuple[list[int], list["VisionSpan"], list[tuple[int, int]]]:
    """Put media items into a tokenized prompt that holds one placeholder per item, in order: <|image_pad|> for an
    image, <|video_pad|> for a video (with or without the <|vision_start|>/<|vision_end|> around it, as chat
    templates render them). An image's placeholder becomes one pad token per merged patch; a video's becomes,
    per temporal patch, its timestamp text ("<0.2 seconds>", by `encode_text`), <|vision_start|>, the frame's pad
    tokens and <|vision_end|> (Qwen3-VL's processor). `vision` is the model's VisionConfig.

    Returns (token ids, one VisionSpan per run of pad tokens, and for each span (item index, temporal patch)).
    MediaError when placeholders and items do not match."""
    from qwenpd.engine.mrope import VisionSpan

    m2 = vision.spatial_merge_size ** 2
    pads = {vision.image_token_id: "image", vision.video_token_id: "video"}
    found = [(i, pads[t]) for i, t in enumerate(ids) if t in pads]
    if [k for _, k in found] != [p.kind for p in items]:
        raise MediaError(f"the prompt has {len(found)} media placeholder(s) "
                         f"({', '.join(k for _, k in found) or 'none'}) for {len(items)} item(s) "
                         f"({', '.join(p.kind for p in items) or 'none'}); put one <|image_pad|> or <|video_pad|> "
                         "per item, in order")
    out: list[int] = []
    spans: list[VisionSpan] = []
    owners: list[tuple[int, int]] = []
    cursor = 0
    for n, ((at, kind), item) in enumerate(zip(found, items)):
        t, h, w = item.grid
        m = vision.spatial_merge_size
        if kind == "image":
            out.extend(ids[cursor:at])
            spans.append(VisionSpan(len(out), t, h // m, w // m))
            owners.append((n, 0))
            out.extend([vision.image_token_id] * (t * h * w // m2))
            cursor = at + 1
            continue
        lo, hi = at, at + 1  # the template's own start/end around the placeholder go: each frame gets its own
        if lo > cursor and ids[lo - 1] == vision.vision_start_token_id and hi < len(ids) \
                and ids[hi] == vision.vision_end_token_id:
            lo, hi = lo - 1, hi + 1
        out.extend(ids[cursor:lo])
        if encode_text is None:
            raise MediaError("a video needs the model's tokenizer (for the timestamps between its frames)")
        for f, stamp in enumerate(item.timestamps):
            out.extend(encode_text(f"<{stamp:.1f} seconds>"))
            out.append(vision.vision_start_token_id)
            spans.append(VisionSpan(len(out), 1, h // m, w // m))
            owners.append((n, f))
            out.extend([vision.video_token_id] * (h * w // m2))
            out.append(vision.vision_end_token_id)
        cursor = hi
    out.extend(ids[cursor:])
    return out, spans, owners
