"""Images and video in the engine, against transformers' Qwen3_5ForConditionalGeneration on a checkpoint it made:
the tower's embeddings, the mRoPE positions, and greedy tokens of prompts with one image, two images and a video,
prefilled in chunks that cut through the images and decoded step by step."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.engine import DecodeBatch, Engine
from qwenpd.engine.layers import Rotary
from qwenpd.engine.media import (MediaError, MediaLimits, ProcessorSpec, decode_image, image_pixels, place,
                                 video_pixels)
from qwenpd.engine.mrope import VisionSpan, rope_positions
from qwenpd.engine.vision import prompt_media
from tests.hf_models import save_vision_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    return save_vision_checkpoint(tmp_path_factory.mktemp("vision") / "ck")


def _image(h: int, w: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _hf_processor(ck):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    raw = json.loads((ck / "preprocessor_config.json").read_text())
    return Qwen2VLImageProcessorPil(**{k: v for k, v in raw.items() if k not in ("image_processor_type",
                                                                                   "processor_class")})


def _spec(ck) -> tuple[ProcessorSpec, ProcessorSpec]:
    return ProcessorSpec.from_checkpoint(ck, 4, 2, 2)


@pytest.mark.parametrize("shape", [(30, 45), (7, 200), (300, 90), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_rows_equal_transformers_pil_processor(vision_checkpoint, shape):
    img = _image(*shape, seed=shape[0])
    mine = image_pixels(decode_image(_png(img)), _spec(vision_checkpoint)[0])
    ref = _hf_processor(vision_checkpoint)(img, return_tensors="np")
    assert [list(mine.grid)] == ref["image_grid_thw"].tolist()
    assert np.array_equal(mine.values, ref["pixel_values"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tower_embeddings_equal_transformers(vision_checkpoint, dtype):
    from transformers import Qwen3_5ForConditionalGeneration

    out = _hf_processor(vision_checkpoint)([_image(30, 45, 0), _image(20, 20, 1)], return_tensors="pt")
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(vision_checkpoint, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        ref = hf.model.get_image_features(out["pixel_values"], out["image_grid_thw"]).pooler_output
    eng = Engine(vision_checkpoint, dtype=dtype)
    mine = eng.encode_images(out["pixel_values"], [tuple(g) for g in out["image_grid_thw"].tolist()])
    for a, b in zip(mine, ref):
        assert torch.equal(a, b.to(a.dtype))


def test_rope_positions_equal_transformers(vision_checkpoint):
    from transformers import Qwen3_5ForConditionalGeneration

    hf = Qwen3_5ForConditionalGeneration.from_pretrained(vision_checkpoint).eval()
    # text, an image of 3x5 merged patches, text, two frames of a 2x2 video separated by text, text
    types = [0] * 4 + [1] * 15 + [0] * 3 + [2] * 4 + [0] * 2 + [2] * 4 + [0] * 5
    spans = [VisionSpan(4, 1, 3, 5), VisionSpan(22, 1, 2, 2), VisionSpan(28, 1, 2, 2)]
    ids = torch.zeros(1, len(types), dtype=torch.long)
    ref, delta = hf.model.get_rope_index(ids, torch.tensor([types]), image_grid_thw=torch.tensor([[1, 6, 10]]),
                                         video_grid_thw=torch.tensor([[2, 4, 4]]))
    mine, my_delta = rope_positions(len(types), spans)
    assert torch.tensor(mine).T.tolist() == ref[:, 0].tolist()
    assert my_delta == int(delta)


def test_text_mrope_has_the_bits_of_plain_rope():
    cfg = ModelConfig.from_hf_dict(json.loads(json.dumps({
        "model_type": "qwen3_5_text", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                                         "mrope_section": [3, 3, 2]}})))
    rot = Rotary(cfg, torch.device("cpu"))
    pos = torch.arange(0, 5000, 7)
    a = rot.cos_sin(pos, torch.float32)
    b = rot.cos_sin(pos[:, None].expand(-1, 3), torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _hf_greedy(ck, ids, n, **inputs):
    from transformers import Qwen3_5ForConditionalGeneration

    hf = Qwen3_5ForConditionalGeneration.from_pretrained(ck, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, **inputs)
    return out[0, len(ids):].tolist()


def _ours(eng: Engine, ids, media, n, chunk):
    logits, state = eng.prefill(ids, chunk_size=chunk, media=media)
    tokens = [int(logits.argmax())]
    batch = DecodeBatch(eng, 2)
    other = eng.prefill([20, 21, 22])[1]  # a text sequence decodes beside it: per-row rope offsets
    batch.add(other)
    batch.add(state)
    for _ in range(n - 1):
        tokens.append(int(batch.step([23, tokens[-1]])[1].argmax()))
    return tokens, state


@pytest.mark.parametrize("shapes,chunk", [([(30, 45)], 7), ([(30, 45), (20, 24)], 16), ([(40, 16)], 512)],
                         ids=["one-image-chunk7", "two-images-chunk16", "tall-image-one-chunk"])
def test_image_prompts_greedy_equal_transformers(vision_checkpoint, shapes, chunk):
    eng = Engine(vision_checkpoint, dtype="float32")
    v = eng.config.vision
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    items = [image_pixels(decode_image(_png(img)), _spec(vision_checkpoint)[0]) for img in images]
    text = [30, 31, 32]
    for _ in items:
        text += [v.vision_start_token_id, v.image_token_id, v.vision_end_token_id, 40, 41]
    embeds = [eng.encode_images(torch.from_numpy(p.values), [p.grid])[0] for p in items]
    ids, media = prompt_media(text, items, embeds, v)
    assert media.delta < 0
    hf_in = _hf_processor(vision_checkpoint)(images, return_tensors="pt")
    mm = torch.tensor([[1 if t == v.image_token_id else 0 for t in ids]])
    theirs = _hf_greedy(vision_checkpoint, ids, 10, pixel_values=hf_in["pixel_values"],
                        image_grid_thw=hf_in["image_grid_thw"], mm_token_type_ids=mm)
    mine, state = _ours(eng, ids, media, 10, chunk)
    assert mine == theirs
    assert state.rope_delta == media.delta


def test_video_prompt_greedy_equals_transformers(vision_checkpoint):
    """Frames prepared by engine/media.py per Qwen3-VL's video processor spec (transformers' own video processor
    needs torchvision, which does not import beside this torch build), fed to both models."""
    eng = Engine(vision_checkpoint, dtype="float32")
    v = eng.config.vision
    frames = [_image(24, 32, seed=10 + i) for i in range(3)]  # 3 frames: the last repeated to 2 temporal patches
    video = video_pixels(frames, _spec(vision_checkpoint)[1])
    assert video.grid[0] == 2 and len(video.timestamps) == 2
    text = [30, 31, v.vision_start_token_id, v.video_token_id, v.vision_end_token_id, 40]
    embeds = [eng.encode_images(torch.from_numpy(video.values), [video.grid])[0]]
    ids, media = prompt_media(text, [video], embeds, v, encode_text=lambda s: [50 + len(s)])
    assert ids.count(v.vision_start_token_id) == 2  # one start/end pair per temporal patch
    mm = torch.tensor([[2 if t == v.video_token_id else 0 for t in ids]])
    theirs = _hf_greedy(vision_checkpoint, ids, 8, pixel_values_videos=torch.from_numpy(video.values),
                        video_grid_thw=torch.tensor([video.grid]), mm_token_type_ids=mm)
    mine, _ = _ours(eng, ids, media, 8, 9)
    assert mine == theirs


def test_prefix_restored_state_continues_with_the_prompts_positions(vision_checkpoint):
    """Prefill of the rest after a restored prefix cut inside the image equals one prefill cut at the same place:
    the media are the whole prompt's, indexed from token 0."""
    eng = Engine(vision_checkpoint, dtype="float32")
    v = eng.config.vision
    item = image_pixels(_image(30, 45, 3), _spec(vision_checkpoint)[0])
    ids, media = prompt_media([30, v.vision_start_token_id, v.image_token_id, v.vision_end_token_id, 41], [item],
                              [eng.encode_images(torch.from_numpy(item.values), [item.grid])[0]], v)
    whole, _ = eng.prefill(ids, media=media, boundaries=[10])
    _, first = eng.prefill(ids[:10], media=media)
    assert first.rope_delta == media.delta_at(10) == 7 + 1 - 10  # the largest position so far is 2 + 5 (row 0)
    restored = eng.state_from_tensors(first.to_tensors(), 10)
    rest, state = eng.prefill(ids[10:], state=restored, media=media)
    assert torch.equal(rest, whole)
    assert state.rope_delta == media.delta


def test_placeholders_must_match_items(vision_checkpoint):
    v = Engine(vision_checkpoint, dtype="float32").config.vision
    item = image_pixels(_image(16, 16, 0), _spec(vision_checkpoint)[0])
    with pytest.raises(MediaError, match="placeholder"):
        place([30, 31], [item], v)
    with pytest.raises(MediaError, match="placeholder"):
        place([v.image_token_id, v.image_token_id], [item], v)


def test_bad_images_are_refused_before_decoding():
    from PIL import Image

    good = _png(_image(40, 40, 0))
    with pytest.raises(MediaError, match="does not decode"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(MediaError, match="supported format"):
        decode_image(b"GIF8not really")
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")  # compresses to a few KB: a decompression bomb in miniature
    with pytest.raises(MediaError) as err:
        decode_image(buf.getvalue(), MediaLimits(max_image_pixels=1_000_000))
    assert err.value.limit == "max_image_pixels"
    with pytest.raises(MediaError) as err:
        decode_image(good, MediaLimits(max_image_bytes=100))
    assert err.value.limit == "max_image_bytes"
    with pytest.raises(MediaError, match="unsupported image type"):
        decode_image(good, mime="image/tiff")
    with pytest.raises(MediaError) as err:
        video_pixels([_image(8, 8, i) for i in range(5)], ProcessorSpec(patch_size=4), MediaLimits(max_video_frames=4))
    assert err.value.limit == "max_video_frames"


def test_image_prompt_with_tensor_parallelism_equals_transformers(vision_checkpoint):
    """tp 2: the tower runs on the leader, every rank takes the chunk's embeddings and positions; decode on both
    ranks adds the rope delta; the state exported and loaded again (a hand-off) keeps it."""
    eng = Engine(vision_checkpoint, dtype="float32", tp=2, threads=1)
    try:
        v = eng.config.vision
        images = [_image(30, 45, seed=0), _image(20, 24, seed=1)]
        items = [image_pixels(decode_image(_png(img)), _spec(vision_checkpoint)[0]) for img in images]
        text = [30, 31]
        for _ in items:
            text += [v.vision_start_token_id, v.image_token_id, v.vision_end_token_id, 40]
        embeds = [eng.encode_images(torch.from_numpy(p.values), [p.grid])[0] for p in items]
        ids, media = prompt_media(text, items, embeds, v)
        hf_in = _hf_processor(vision_checkpoint)(images, return_tensors="pt")
        mm = torch.tensor([[1 if t == v.image_token_id else 0 for t in ids]])
        theirs = _hf_greedy(vision_checkpoint, ids, 8, pixel_values=hf_in["pixel_values"],
                            image_grid_thw=hf_in["image_grid_thw"], mm_token_type_ids=mm)
        logits, state = eng.prefill(ids, chunk_size=11, media=media)
        handed = state.handoff_tensors(0)
        assert int(handed["rope.delta"][0]) == media.delta
        state = eng.state_from_tensors(handed, len(ids))  # what decode does with a hand-off
        batch = DecodeBatch(eng, 1)
        batch.add(state)
        mine = [int(logits.argmax())]
        while len(mine) < 8:
            mine.append(int(batch.step([mine[-1]])[0].argmax()))
        assert mine == theirs
    finally:
        eng.close()


def test_compiled_engine_serves_image_prompts(vision_checkpoint):
    """--compile: an image prompt's chunks run the eager prefill graph at their exact shape (so no bucket
    recompiles), decode runs the compiled graph with the rope offset as an input: the eager engine's tokens."""
    from qwenpd.engine.runner import Buckets

    def tokens(eng):
        v = eng.config.vision
        item = image_pixels(_image(30, 45, 4), _spec(vision_checkpoint)[0])
        ids, media = prompt_media([30, v.vision_start_token_id, v.image_token_id, v.vision_end_token_id, 40], [item],
                                  [eng.encode_images(torch.from_numpy(item.values), [item.grid])[0]], v)
        logits, state = eng.prefill(ids, chunk_size=16, media=media)
        batch = DecodeBatch(eng, 1)
        batch.add(state)
        out = [int(logits.argmax())]
        while len(out) < 8:
            out.append(int(batch.step([out[-1]])[0].argmax()))
        return out

    eager = tokens(Engine(vision_checkpoint, dtype="float32"))
    compiled = Engine(vision_checkpoint, dtype="float32", kv_cache_bytes=1 << 22)
    # decode graphs only: an image prompt's prefill chunks run eagerly whatever is compiled
    compiled.compile(Buckets((16,), (1,), (compiled.default_buckets(16, 1).widths[-1],)), max_batch=1,
                     graphs=("decode",))
    assert tokens(compiled) == eager
