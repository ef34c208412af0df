"""The contract of an image or video between the services that read it (prefill, the encoder pool): how a request's
`Media` are read and checked against the limits (engine/media.py does the decoding and resizing), the content key
an item is known by everywhere (prefix-cache block keys, the encoder cache, stored embeddings), and the one
tensor an encoder instance stores. Both services import this module; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import numpy as np

from qwenpd.engine.media import (MediaError, MediaLimits, Pixels, ProcessorSpec, decode_image, image_pixels,
                                 video_pixels)
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


def read_media(media: Sequence[common_pb2.Media], fields: Sequence[str], engine: Any, limits: MediaLimits,
               max_tokens: int | None = None) -> list[Pixels]:
    """The request's media as patch rows; InvalidArgument naming the field (and the limit) for anything the
    model or the limits do not take. `engine`: an Engine or a VisionModel (its config and model_dir). Items are
    read one at a time, and reading stops as soon as they come to more than `max_tokens` prompt tokens (default:
    the model's context), so a request that cannot fit holds at most one item more than fits."""
    if not media:
        return []
    if engine.config.vision is None:
        raise InvalidArgument(fields[0], "this model has no vision tower: it takes no images or videos")
    if len(media) > limits.max_images_per_request:
        raise InvalidArgument(fields[0], f"{len(media)} images/videos; this service takes at most "
                                         f"{limits.max_images_per_request} per request (--max-images-per-request)",
                              reason="TOO_MANY_IMAGES")
    image_spec, video_spec = processor_specs(engine)
    budget = max_tokens if max_tokens is not None else engine.config.max_position_embeddings
    merge2 = engine.config.vision.spatial_merge_size ** 2
    out, tokens = [], 0
    for m, field in zip(media, fields):
        try:
            kind = m.WhichOneof("source")
            if kind == "image":
                if m.HasField("fps"):
                    raise MediaError("fps is for a video; this item is an image")
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
                out.append(video_pixels(list(m.video.frames), spec, limits, m.mime_type or None))
            else:
                raise MediaError("give an image or a video")
        except MediaError as exc:
            limit = f" (--{exc.limit.replace('_', '-')})" if exc.limit else ""
            raise InvalidArgument(field, f"{exc}{limit}", reason="BAD_MEDIA" if not exc.limit else
                                  exc.limit.upper()) from None
        t, h, w = out[-1].grid
        tokens += t * h * w // merge2
        if tokens > budget:
            raise InvalidArgument(field, f"the images and videos up to this one come to {tokens} prompt tokens, "
                                  f"more than this server takes ({budget})", reason="PROMPT_TOO_LONG")
    return out


def _with_fps(spec: ProcessorSpec, fps: float) -> ProcessorSpec:
    return dataclasses.replace(spec, fps=float(fps))


_SPECS: dict[str, tuple[ProcessorSpec, ProcessorSpec]] = {}


def processor_specs(engine: Any) -> tuple[ProcessorSpec, ProcessorSpec]:
    """The checkpoint's (image, video) processor specs, read once per model directory."""
    if engine.model_dir not in _SPECS:
        v = engine.config.vision
        _SPECS[engine.model_dir] = ProcessorSpec.from_checkpoint(engine.model_dir, v.patch_size,
                                                                 v.temporal_patch_size, v.spatial_merge_size)
    return _SPECS[engine.model_dir]


EMBEDS = "embeds"  # the one tensor of an encoder instance's checkpoint: [tokens, hidden], model dtype
# the checkpoint's metadata: the content key (hex) of the pixels its embeddings were computed from, written by the
# encoder; prefill trusts the store's record of it, never a request's claim
MEDIA_KEY = "qwenpd.media_key"
