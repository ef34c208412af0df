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

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from qwenpd.engine.engine import Engine
from qwenpd.engine.media import MediaError, Pixels, locate, place
from qwenpd.engine.mrope import VisionSpan
from qwenpd.engine.vision import PromptMedia
from qwenpd.errors import InvalidArgument, QwenpdError
from qwenpd.media import EMBEDS, MEDIA_KEY, item_key
from qwenpd.protos.qwenpd.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PromptImages:
    """The media of one prompt, placed: the items, their content keys, and one VisionSpan per run of placeholder
    tokens with (item, temporal patch) for each."""

    items: tuple[Pixels, ...]
    keys: tuple[bytes, ...]
    spans: tuple[VisionSpan, ...]
    owners: tuple[tuple[int, int], ...]
    refs: tuple[str, ...] = ()  # per item: where an encoder instance stored its embeddings ("" = none)

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
        stand_in = torch.zeros((1, hidden), dtype=dtype)  # broadcast to each span's rows: no storage
        return PromptMedia.of_items(num_tokens, self.spans, self.owners,
                                    {n: embeds.get(n) for n in range(len(self.items))}, stand_in)


def place_media(ids: list[int], items: list[Pixels], engine: Engine, field: str, expanded: int | None = None,
                media: Sequence[common_pb2.Media] = ()) -> tuple[list[int], PromptImages]:
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
    keys = tuple(item_key(p) for p in items)
    # an encoder instance's embeddings count only for the pixels they were computed from
    refs = tuple(m.encoded.checkpoint_id if m.HasField("encoded") and m.encoded.key == key else ""
                 for m, key in zip(media, keys)) if media else ()
    return out, PromptImages(tuple(items), keys, tuple(spans), tuple(owners), refs)


class EncoderCache:
    """The vision tower's output per (cache salt, item key), least recently used first out past `max_bytes`.
    Thread-safe; tensors are kept on the engine's device."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str | None, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, salt: str | None, key: bytes) -> torch.Tensor | None:
        with self._lock:
            t = self._entries.get((salt, key))
            if t is not None:
                self._entries.move_to_end((salt, key))
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
          salt: str | None, store: Any = None, on_stored: Any = None) -> dict[int, torch.Tensor]:
    """The tower's output for the `needed` items: from the cache where it has them, else from the cache store
    where an encoder instance left them (images.refs; `on_stored(n)` per item read there), the rest in one
    pass of the tower."""
    out: dict[int, torch.Tensor] = {}
    missing = []
    for n in needed:
        hit = cache.get(salt, images.keys[n]) if cache is not None else None
        if hit is None and store is not None and n < len(images.refs) and images.refs[n]:
            hit = _stored(engine, store, images.refs[n], images.items[n], images.keys[n])
            if hit is not None:
                if on_stored is not None:
                    on_stored(n)
                if cache is not None:
                    cache.put(salt, images.keys[n], hit)
        if hit is not None:
            out[n] = hit
        else:
            missing.append(n)
    for n in missing:  # one tower pass per item: the activations of one image at a time
        item = images.items[n]
        out[n] = e = engine.encode_images(torch.from_numpy(item.values), [item.grid])[0]
        if cache is not None:
            cache.put(salt, images.keys[n], e)
    return out


def _stored(engine: Engine, store: Any, checkpoint_id: str, item: Pixels, key: bytes) -> torch.Tensor | None:
    """An item's embeddings from the cache store (a copy on the engine's device), None when they are gone, do not
    fit this model (checked against the vision fingerprint, the item's token count and the model dtype) or were
    computed from other pixels (the content key the encoder recorded with them is not `key`: a request's claim
    about a reference is never trusted)."""
    m2 = engine.config.vision.spatial_merge_size ** 2
    tokens = item.grid[0] * item.grid[1] * item.grid[2] // m2
    try:
        ckpt = store.get_checkpoint(checkpoint_id, engine.vision_fingerprint,
                                    {EMBEDS: (tokens, engine.config.hidden_size)}, {EMBEDS: engine.dtype})
    except QwenpdError as exc:
        log.info("stored embeddings %s not used, running the tower: %s", checkpoint_id, exc.message)
        return None
    try:
        if ckpt.metadata.get(MEDIA_KEY) != key.hex():
            log.warning("stored embeddings %s are not of this request's pixels: running the tower", checkpoint_id)
            return None
        return ckpt.tensors[EMBEDS].to(engine.device, copy=True)
    finally:
        ckpt.tensors.clear()
        try:
            store.release(ckpt)
        except QwenpdError:
            pass


def template_content(message: common_pb2.ChatMessage, i: int, vision: bool = True
                     ) -> tuple[Any, list[common_pb2.Media], list[str]]:
    """A message's content as the template takes it (a string, or parts with media as {"type": "image"|"video"}),
    and its media with their field names. Without `vision` (a model without a tower) a media part is refused
    here, before any template sees it."""
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
            if not vision:
                raise InvalidArgument(f"chat.messages[{i}].parts[{j}].media", "this model has no vision tower: it "
                                      "takes no images or videos")
            source = part.media.WhichOneof("source")
            parts.append({"type": source or "image"})
            media.append(part.media)
            fields.append(f"chat.messages[{i}].parts[{j}].media")
        else:
            raise InvalidArgument(f"chat.messages[{i}].parts[{j}]", "an empty content part")
    return parts, media, fields
