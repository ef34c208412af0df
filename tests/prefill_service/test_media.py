"""The prefill side of images (prefill_service/media.py, prompt.py): placement in chat and text prompts, a
resumed prompt's items found again among its generated tokens, prefix-cache keys by image content, the encoder
cache; and the gateway's URL policy (gateway/media.py) against a local HTTP server."""

from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest
import torch

from qwenpd.clients.chat_request import chat_message
from qwenpd.engine import Engine
from qwenpd.errors import InvalidArgument
from qwenpd.gateway.media import MediaFetcher
from qwenpd.limits import Limits
from qwenpd.prefill_service.media import EncoderCache, embed
from qwenpd.prefill_service.prefix_policy import block_keys
from qwenpd.prefill_service.prompt import encode_prompt
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2
from tests.hf_models import save_vision_checkpoint


def _png(seed: int, h: int = 32, w: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(save_vision_checkpoint(tmp_path_factory.mktemp("media") / "ck"), dtype="float32", warm_up=False)


def _chat(*parts) -> prefill_pb2.PrefillRequest:
    content = [{"type": "text", "text": p} if isinstance(p, str) else
               {"type": "image", "image": p} for p in parts]
    req = prefill_pb2.PrefillRequest()
    req.chat.messages.append(chat_message({"role": "user", "content": content}, 0))
    return req


def test_chat_parts_become_placeholder_runs(engine):
    v = engine.config.vision
    prompt = encode_prompt(_chat("a", _png(0, 32, 48), "b", _png(1)), engine, Limits())
    runs = [s for s in prompt.images.spans]
    assert [(s.h, s.w) for s in runs] == [(4, 6), (4, 4)]
    assert prompt.ids.count(v.image_token_id) == prompt.images.image_tokens == 24 + 16
    assert all(prompt.ids[s.start - 1] == v.vision_start_token_id and prompt.ids[s.end] == v.vision_end_token_id
               for s in runs)


def test_text_prompt_takes_media_in_placeholder_order(engine):
    req = prefill_pb2.PrefillRequest(text="x<|image_pad|>y<|image_pad|>", media=[common_pb2.Media(image=_png(2)),
                                                                                common_pb2.Media(image=_png(3))])
    assert encode_prompt(req, engine, Limits()).images.image_tokens == 32
    req.media.pop()
    with pytest.raises(InvalidArgument, match="placeholder"):
        encode_prompt(req, engine, Limits())
    with pytest.raises(InvalidArgument, match="placeholder"):  # pad tokens with nothing to stand for
        encode_prompt(prefill_pb2.PrefillRequest(text="x<|image_pad|>"), engine, Limits())


def test_a_resumed_prompt_finds_its_images_among_generated_pad_tokens(engine):
    v = engine.config.vision
    first = encode_prompt(_chat("look", _png(4)), engine, Limits())
    generated = [v.image_token_id, 40, v.image_token_id]  # a model may generate pad tokens
    resumed = prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=first.ids + generated),
                                         media=[common_pb2.Media(image=_png(4))], resume_generated=len(generated))
    again = encode_prompt(resumed, engine, Limits())
    assert again.ids == first.ids + generated
    assert again.images.spans == first.images.spans and again.images.keys == first.images.keys


def test_block_keys_follow_image_content(engine):
    a = encode_prompt(_chat("same text " * 8, _png(5), "tail"), engine, Limits())
    b = encode_prompt(_chat("same text " * 8, _png(6), "tail"), engine, Limits())
    assert a.ids == b.ids  # the same tokens: only the pictures differ
    ka = block_keys("fp", None, a.ids, 16, media=a.images.key_spans())
    kb = block_keys("fp", None, b.ids, 16, media=b.images.key_spans())
    first_image_block = a.images.spans[0].start // 16
    assert ka[:first_image_block] == kb[:first_image_block]
    assert all(x != y for x, y in zip(ka[first_image_block:], kb[first_image_block:]))
    assert ka == block_keys("fp", None, a.ids, 16, media=encode_prompt(
        _chat("same text " * 8, _png(5), "tail"), engine, Limits()).images.key_spans())


def test_encoder_cache_skips_the_tower_and_keeps_tenants_apart(engine, monkeypatch):
    prompt = encode_prompt(_chat("a", _png(7), _png(8)), engine, Limits())
    cache = EncoderCache(1 << 20)
    calls = []
    real = engine.encode_images
    monkeypatch.setattr(engine, "encode_images", lambda px, grids: calls.append(len(grids)) or real(px, grids))
    cold = embed(engine, prompt.images, [0, 1], cache, "tenant-a")
    warm = embed(engine, prompt.images, [0, 1], cache, "tenant-a")
    other = embed(engine, prompt.images, [1], cache, "tenant-b")
    assert calls == [1, 1, 1]  # cold: one pass per item; warm: no tower; another tenant: its own
    assert all(torch.equal(cold[n], warm[n]) for n in (0, 1)) and torch.equal(other[1], cold[1])
    tiny = EncoderCache(cold[0].numel() * cold[0].element_size())  # room for one: the older goes
    tiny.put(None, b"x", cold[0])
    tiny.put(None, b"y", cold[1])
    assert tiny.get(None, b"x") is None and tiny.get(None, b"y") is not None


def test_limits_name_themselves(engine):
    req = _chat(*[_png(i, 16, 16) for i in range(3)])
    with pytest.raises(InvalidArgument, match="max-images-per-request"):
        encode_prompt(req, engine, Limits(max_images_per_request=2))
    with pytest.raises(InvalidArgument, match="max-image-pixels"):
        encode_prompt(_chat(_png(0, 64, 64)), engine, Limits(max_image_pixels=4000))
    video = common_pb2.Media(video=common_pb2.VideoFrames(frames=[_png(i, 16, 16) for i in range(5)]))
    req = prefill_pb2.PrefillRequest()
    req.chat.messages.add(role="user", parts=[common_pb2.ContentPart(media=video)])
    with pytest.raises(InvalidArgument, match="max-video-frames"):
        encode_prompt(req, engine, Limits(max_video_frames=4))


@pytest.fixture(scope="module")
def image_server():
    body = _png(9)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://elsewhere.invalid/x.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()


def test_fetch_policy(image_server, tmp_path):
    base, body = image_server
    with pytest.raises(InvalidArgument, match="allowed-media-domains"):
        MediaFetcher()(f"{base}/a.png", "f")
    allowed = MediaFetcher(allowed_domains=("127.0.0.1",))
    assert allowed(f"{base}/a.png", "f") == (body, "image/png")
    with pytest.raises(InvalidArgument, match="redirects"):
        allowed(f"{base}/redirect", "f")
    with pytest.raises(InvalidArgument, match="allowed-media-domains"):
        allowed("http://127.0.0.2/a.png", "f")
    (tmp_path / "ok.png").write_bytes(body)
    with pytest.raises(InvalidArgument, match="allowed-local-media-path"):
        MediaFetcher()(f"file://{tmp_path}/ok.png", "f")
    local = MediaFetcher(allowed_local_path=str(tmp_path))
    assert local(f"file://{tmp_path}/ok.png", "f")[0] == body
    with pytest.raises(InvalidArgument, match="not under"):
        local(f"file://{tmp_path}/../etc/passwd", "f")
    with pytest.raises(InvalidArgument, match="base64"):
        local("data:image/png,raw", "f")


def test_a_text_only_model_refuses_media(tiny_model_dir):
    text_engine = Engine(tiny_model_dir, warm_up=False)
    with pytest.raises(InvalidArgument, match="no vision tower") as err:
        encode_prompt(_chat("look", _png(0)), text_engine, Limits())
    assert err.value.field == "chat.messages[0].parts[1].media"
    plain = encode_prompt(prefill_pb2.PrefillRequest(text="x<|image_pad|>"), text_engine, Limits())
    assert plain.images is None  # not a special token here: text like any other


def test_adjacent_images_are_found_again_in_a_resumed_prompt(engine):
    first = encode_prompt(prefill_pb2.PrefillRequest(
        text="<|image_pad|><|image_pad|>", media=[common_pb2.Media(image=_png(1)), common_pb2.Media(image=_png(2))]),
        engine, Limits())
    resumed = prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=first.ids + [40]), resume_generated=1,
                                         media=[common_pb2.Media(image=_png(1)), common_pb2.Media(image=_png(2))])
    assert encode_prompt(resumed, engine, Limits()).images.spans == first.images.spans


class _Store:
    """A cache store holding one stored item's embeddings, recorded as computed from `key`."""

    def __init__(self, embeds, key: bytes):
        from qwenpd.media import EMBEDS, MEDIA_KEY

        self.ckpt = type("Leased", (), {})()
        self.ckpt.tensors, self.ckpt.metadata = {EMBEDS: embeds}, {MEDIA_KEY: key.hex()}
        self.reads = 0

    def get_checkpoint(self, checkpoint_id, fingerprint, shapes, dtypes):
        self.reads += 1
        return self.ckpt

    def release(self, ckpt):
        pass


def test_a_stored_reference_counts_only_for_the_pixels_it_was_computed_from(engine):
    """A request claims another picture's stored embeddings are its own (Media.encoded with its own key): prefill
    reads the key the encoder recorded in the store, sees the mismatch and runs the tower."""
    own, other = _png(11), _png(12)
    req = _chat("x", own)
    req.chat.messages[0].parts[1].media.encoded.checkpoint_id = "forged"
    prompt = encode_prompt(req, engine, Limits())
    req.chat.messages[0].parts[1].media.encoded.key = prompt.images.keys[0]  # the claim: "these are mine"
    prompt = encode_prompt(req, engine, Limits())
    assert prompt.images.refs == ("forged",)
    truth = embed(engine, prompt.images, [0], None, None)[0]
    wrong = embed(engine, encode_prompt(_chat("x", other), engine, Limits()).images, [0], None, None)[0]
    forged = _Store(wrong, key=b"someone else's pixels")
    assert torch.equal(embed(engine, prompt.images, [0], None, None, forged)[0], truth) and forged.reads == 1
    honest = _Store(truth + 1, key=prompt.images.keys[0])  # recorded for these pixels: used as stored
    assert torch.equal(embed(engine, prompt.images, [0], None, None, honest)[0], truth + 1)


def test_media_fields_are_honoured_or_refused(engine):
    png = _png(0)
    with pytest.raises(InvalidArgument, match="not a JPEG image"):
        encode_prompt(_chat_media(common_pb2.Media(image=png, mime_type="image/jpeg")), engine, Limits())
    with pytest.raises(InvalidArgument, match="fps is for a video"):
        encode_prompt(_chat_media(common_pb2.Media(image=png, fps=2.0)), engine, Limits())
    many = _chat(*[_png(i, 64, 64) for i in range(3)])  # 64 tokens each
    with pytest.raises(InvalidArgument, match="more than this server takes") as err:
        encode_prompt(many, engine, Limits(max_prompt_tokens=100))
    assert err.value.field == "chat.messages[0].parts[1].media"  # refused at the second, the third never read


def _chat_media(media: common_pb2.Media) -> prefill_pb2.PrefillRequest:
    req = prefill_pb2.PrefillRequest()
    req.chat.messages.add(role="user", parts=[common_pb2.ContentPart(text="x"), common_pb2.ContentPart(media=media)])
    return req
