"""Per-request limits of the prefill and decode services: what one request may ask for. Plain Python.

A request past a limit is refused with INVALID_ARGUMENT naming the field (it would never succeed as sent); a
full queue, batch or cache is RESOURCE_EXHAUSTED elsewhere (waiting may help). Message size is enforced by
gRPC itself (RESOURCE_EXHAUSTED), on both servers and clients.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenpd.errors import InvalidArgument

if TYPE_CHECKING:
    from qwenpd.engine.sampling import SamplingParams

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # control plane only: prompts and token lists, never tensors


@dataclass(slots=True, frozen=True)
class Limits:
    """max_prompt_tokens: None = the model's maximum context. max_new_tokens: most tokens one request may
    generate (sampling.max_tokens). max_stop_strings / max_stop_length: how many stop strings, and characters
    each. max_message_bytes: largest gRPC message received or sent. max_cache_bytes_per_request: most bytes of
    new prefix-cache entries (KV blocks + DeltaNet snapshots, tensor bytes) one prompt may add; a prompt that
    would add more is served without caching it (None = no limit)."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int = 8192
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_cache_bytes_per_request: int | None = None
    # images and videos (models with a vision tower): decoded pixels per image (from the header, before decoding),
    # media items per request (an image or a video each), frames per video, bytes per encoded image
    max_image_pixels: int = 40_000_000
    max_images_per_request: int = 16
    max_video_frames: int = 64
    max_image_bytes: int = 20 << 20

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_new_tokens", "max_stop_strings", "max_stop_length",
                     "max_message_bytes", "max_cache_bytes_per_request", "max_image_pixels",
                     "max_images_per_request", "max_video_frames", "max_image_bytes"):
            value = getattr(self, name)
            floor = 0 if name in ("max_stop_strings", "max_cache_bytes_per_request") else 1
            if value is not None and value < floor:
                raise ValueError(f"{name} must be >= {floor}, got {value}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")

    def check_prompt(self, num_tokens: int, field: str) -> None:
        if self.max_prompt_tokens is not None and num_tokens > self.max_prompt_tokens:
            raise InvalidArgument(field, f"the prompt has {num_tokens} tokens; this service accepts at most "
                                         f"{self.max_prompt_tokens}", reason="PROMPT_TOO_LONG")

    def check_sampling(self, params: SamplingParams, prefix: str = "sampling") -> None:
        if params.max_tokens > self.max_new_tokens:
            raise InvalidArgument(f"{prefix}.max_tokens", f"{params.max_tokens} is more than this service's "
                                  f"limit of {self.max_new_tokens} new tokens", reason="MAX_TOKENS_TOO_LARGE")
        if len(params.stop) > self.max_stop_strings:
            raise InvalidArgument(f"{prefix}.stop", f"{len(params.stop)} stop strings; at most "
                                  f"{self.max_stop_strings} are accepted", reason="TOO_MANY_STOP_STRINGS")
        for i, s in enumerate(params.stop):
            if len(s) > self.max_stop_length:
                raise InvalidArgument(f"{prefix}.stop[{i}]", f"{len(s)} characters; a stop string may have at "
                                      f"most {self.max_stop_length}", reason="STOP_STRING_TOO_LONG")



def add_args(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the model's maximum context)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"largest max_tokens a request may ask for (default {d.max_new_tokens})")
    p.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help=f"stop strings per request (default {d.max_stop_strings})")
    p.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                   help=f"characters per stop string (default {d.max_stop_length})")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help=f"largest gRPC message received or sent (default {d.max_message_bytes})")
    p.add_argument("--max-cache-bytes-per-request", type=int, default=None,
                   help="most bytes of new prefix-cache entries one prompt may add; past it the prompt is served "
                        "without being cached (default: no limit)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"most pixels (width x height) of one image as sent, checked before it is decoded "
                        f"(default {d.max_image_pixels})")
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request,
                   help=f"images and videos per request (default {d.max_images_per_request})")
    p.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                   help=f"frames per video (default {d.max_video_frames})")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes,
                   help=f"bytes of one encoded image or video frame (default {d.max_image_bytes})")


def from_args(args: argparse.Namespace) -> Limits:
    return Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                  max_stop_strings=args.max_stop_strings, max_stop_length=args.max_stop_length,
                  max_message_bytes=args.max_message_bytes,
                  max_cache_bytes_per_request=args.max_cache_bytes_per_request,
                  max_image_pixels=args.max_image_pixels, max_images_per_request=args.max_images_per_request,
                  max_video_frames=args.max_video_frames, max_image_bytes=args.max_image_bytes)
