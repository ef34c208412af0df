"""A prompt's images and videos on the prefill side: read from the request (decoded and checked against the
limits: engine/media.py), placed in the token ids, keyed by content, and encoded by the vision tower unless the
encoder cache or the prefix cache already has what they give.

Content keys: each item's key is a digest of the pixel rows the tower reads (after resizing) and its grid, so
the same picture sent as PNG or as JPEG-that-decodes-the-same shares entries, and any change of a pixel does not.
The prefix cache mixes the keys of the items a block covers into that block's key (prefix_policy.block_keys):
a repeated image prompt hits, a different image with the same text never does. The encoder cache is keyed by the
item's key and the request's cache salt (tenants never share embeddings either).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from qwenpd.engine.engine import Engine
from qwenpd.engine.media import (MediaError, MediaLimits, Pixels, ProcessorSpec, decode_image, image_pixels, locate,
                                 place, video_pixels)
from qwenpd.engine.mrope import VisionSpan
from qwenpd.engine.vision import PromptMedia
from qwenpd.errors import InvalidArgument
from qwenpd.limits import Limits
from qwenpd.protos.qwenpd.v1 import common_pb2


def item_key(p: Pixels) -> bytes:
    """The content key of one image or video: its grid, kind and pixel rows."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{p.kind}:{p.grid}:{p.timestamps}:".encode())
    h.update(np.ascontiguousarray(p.values).view(np.uint8).data)
    return h.digest()


def media_limits(limits: Limits) -> MediaLimits:
    """The service's media limits as engine/media.py takes them."""
    return MediaLimits(max_image_pixels=limits.max_image_pixels, max_images_per_request=limits.max_images_per_request,
                       max_video_frames=limits.max_video_frames, max_image_bytes=limits.max_image_bytes)


def read_media(media: Sequence[common_pb2.Media], fields: Sequence[str], engine: Engine, limits: MediaLimits
               ) -> list[Pixels]:
    """The request's media as patch rows; InvalidArgument naming the field (and the limit) for anything the
    model or the limits do not take."""
    if not media:
        return []
    if engine.config.vision is None:
        raise InvalidArgument(fields[0], "this model has no vision tower: it takes no images or videos")
    if len(media) > limits.max_images_per_request:
        raise InvalidArgument(fields[0], f"{len(media)} images/videos; this service takes at most "
                                         f"{limits.max_images_per_request} per request (--max-images-per-request)",
                              reason="TOO_MANY_IMAGES")
    image_spec, video_spec = processor_specs(engine)
    out = []
    for m, field in zip(media, fields):
        try:
            kind = m.WhichOneof("source")
            if kind == "image":
                out.append(image_pixels(decode_image(m.image, limits, m.mime_type or None), image_spec))
            elif kind == "video":
                if len(m.video.frames) > limits.max_video_frames:
                    raise MediaError(f"video of {len(m.video.frames)} frames is over the limit of "
                                     f"{limits.max_video_frames}", "max_video_frames")
                spec = video_spec
                if m.HasField("fps"):
                    if not 0.01 <= m.fps <= 240:
                        raise MediaError(f"fps must be in [0.01, 240], got {m.fps}")
                    spec = _with_fps(video_spec, m.fps)
                frames = [decode_image(f, limits, m.mime_type or None) for f in m.video.frames]
                if len({f.size for f in frames}) > 1:
                    raise MediaError("all frames of a video must have the same size")
                out.append(video_pixels(frames, spec, limits))
            else:
                raise MediaError("give an image or a video")
        except MediaError as exc:
            limit = f" (--{exc.limit.replace('_', '-')})" if exc.limit else ""
            raise InvalidArgument(field, f"{exc}{limit}", reason="BAD_MEDIA" if not exc.limit else
                                  exc.limit.upper()) from None
    return out


def _with_fps(spec: ProcessorSpec, fps: float) -> ProcessorSpec:
    import dataclasses

    return dataclasses.replace(spec, fps=float(fps))


_SPECS: dict[str, tuple[ProcessorSpec, ProcessorSpec]] = {}


def processor_specs(engine: Engine) -> tuple[ProcessorSpec, ProcessorSpec]:
    """The checkpoint's (image, video) processor specs, read once per model directory."""
    if engine.model_dir not in _SPECS:
        v = engine.config.vision
        _SPECS[engine.model_dir] = ProcessorSpec.from_checkpoint(engine.model_dir, v.patch_size,
                                                                 v.temporal_patch_size, v.spatial_merge_size)
    return _SPECS[engine.model_dir]


@dataclass(frozen=True, slots=True)
class PromptImages:
    """The media of one prompt, placed: the items, their content keys, and one VisionSpan per run of placeholder
    tokens with (item, temporal patch) for each."""

    items: tuple[Pixels, ...]
    keys: tuple[bytes, ...]
    spans: tuple[VisionSpan, ...]
    owners: tuple[tuple[int, int], ...]

    @property
    def image_tokens(self) -> int:
        return sum(s.length for s in self.spans)

    def key_spans(self) -> list[tuple[int, int, bytes]]:
        """(start, end, key) of every span: what the prefix cache mixes into the keys of the blocks they touch."""
        return [(s.start, s.end, self.keys[n] + frame.to_bytes(4, "little"))
                for s, (n, frame) in zip(self.spans, self.owners)]

    def needed(self, from_token: int) -> list[int]:
        """The items whose tokens reach past `from_token` (what a prefill from there must embed)."""
        return sorted({n for s, (n, _) in zip(self.spans, self.owners) if s.end > from_token})

    def prompt_media(self, num_tokens: int, embeds: dict[int, torch.Tensor], hidden: int, dtype: torch.dtype
                     ) -> PromptMedia:
        """PromptMedia over the embeddings of the items in `embeds` (the others are before the restored prefix:
        stand-ins that prefill never reads)."""
        per_span = []
        for s, (n, frame) in zip(self.spans, self.owners):
            e = embeds.get(n)
            per_span.append(e[frame * s.length:(frame + 1) * s.length] if e is not None
                            else torch.empty((s.length, hidden), dtype=dtype))
        return PromptMedia(num_tokens, list(self.spans), per_span)


def place_media(ids: list[int], items: list[Pixels], engine: Engine, field: str, expanded: int | None = None
                ) -> tuple[list[int], PromptImages]:
    """Expand the placeholders of `ids` for `items` (engine/media.py place), or with `expanded` (the length of
    the prompt in `ids`) find the items' runs of tokens in a prompt that has them already (a resumed request's,
    followed by the tokens it generated); InvalidArgument naming `field`."""
    tok = engine.tokenizer
    try:
        if expanded is not None:
            out = list(ids)
            spans, owners = locate(ids[:expanded], items, engine.config.vision)
        else:
            out, spans, owners = place(ids, items, engine.config.vision,
                                       None if tok is None else (lambda s: tok.encode(s)))
    except MediaError as exc:
        raise InvalidArgument(field, str(exc), reason="MEDIA_PLACEHOLDERS") from None
    return out, PromptImages(tuple(items), tuple(item_key(p) for p in items), tuple(spans), tuple(owners))


class EncoderCache:
    """The vision tower's output per (cache salt, item key), least recently used first out past `max_bytes`.
    Thread-safe; tensors are kept on the engine's device."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str | None, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, salt: str | None, key: bytes) -> torch.Tensor | None:
        with self._lock:
            t = self._entries.get((salt, key))
            if t is None:
                self.misses += 1
                return None
            self._entries.move_to_end((salt, key))
            self.hits += 1
            return t

    def put(self, salt: str | None, key: bytes, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if (salt, key) in self._entries:
                return
            self._entries[(salt, key)] = t
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


def embed(engine: Engine, images: PromptImages, needed: list[int], cache: EncoderCache | None,
          salt: str | None) -> dict[int, torch.Tensor]:
    """The tower's output for the `needed` items: from the cache where it has them, the rest in one pass."""
    out: dict[int, torch.Tensor] = {}
    missing = []
    for n in needed:
        hit = cache.get(salt, images.keys[n]) if cache is not None else None
        if hit is not None:
            out[n] = hit
        else:
            missing.append(n)
    if missing:
        pixels = torch.from_numpy(np.concatenate([images.items[n].values for n in missing]))
        for n, e in zip(missing, engine.encode_images(pixels, [images.items[n].grid for n in missing])):
            out[n] = e
            if cache is not None:
                cache.put(salt, images.keys[n], e)
    return out


def template_content(message: common_pb2.ChatMessage, i: int) -> tuple[Any, list[common_pb2.Media], list[str]]:
    """A message's content as the template takes it (a string, or parts with media as {"type": "image"|"video"}),
    and its media with their field names."""
    if not message.parts:
        return message.content, [], []
    if message.content:
        raise InvalidArgument(f"chat.messages[{i}].content", "give the content or its parts, not both")
    parts, media, fields = [], [], []
    for j, part in enumerate(message.parts):
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append({"type": "text", "text": part.text})
        elif kind == "media":
            source = part.media.WhichOneof("source")
            parts.append({"type": source or "image"})
            media.append(part.media)
            fields.append(f"chat.messages[{i}].parts[{j}].media")
        else:
            raise InvalidArgument(f"chat.messages[{i}].parts[{j}]", "an empty content part")
    return parts, media, fields
