"""Images and video through the services (issue 26): `serve all` on a multimodal checkpoint made by transformers.
Greedy tokens of chat prompts with one and two images (OpenAI API, data URLs) and of a video (gRPC frames) equal
transformers' Qwen3_5ForConditionalGeneration on the same prompt; a repeated image hits the prefix cache (same
tokens), a different image after the same text does not; a stream killed mid-way resumes identically; bad
images are 400 / INVALID_ARGUMENT naming the limit while a good request is served."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import threading

import grpc
import httpx
import numpy as np
import pytest
import torch

from qwenpd.engine import Engine
from qwenpd.limits import Limits
from qwenpd.prefill_service.prompt import encode_prompt
from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc, prefill_pb2
from tests.hf_models import save_vision_checkpoint
from tests.services.conftest import start_serve_all, stop_serve_all
from tests.services.test_exact_resume import _decode_pid, _run

pytestmark = pytest.mark.timeout(600)


def _png(seed: int, h: int = 64, w: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_vision_checkpoint(tmp_path_factory.mktemp("vision-ckpt") / "ck", seed=5)


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision-serve")
    s = start_serve_all(checkpoint, tmp, f"vis{os.getpid()}", "--block-size", "16", "--snapshot-interval", "16",
                        "--max-images-per-request", "3", "--max-image-pixels", "250000", "--resume-wait", "120",
                        "--decode-checkpoint-every", "16")
    s.tmp = tmp
    s.model = httpx.get(f"http://{s.http}/v1/models", timeout=30).json()["data"][0]["id"]
    yield s
    assert stop_serve_all(s) == 0


def _chat(s, content: list, max_tokens: int = 12) -> httpx.Response:
    body = {"model": s.model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"http://{s.http}/v1/chat/completions", json=body, timeout=120)


def _transformers_greedy(checkpoint, request: prefill_pb2.PrefillRequest, images, n: int, video=None) -> list[int]:
    """transformers' greedy tokens for the prompt our prefill builds from `request` (its ids, placeholders
    expanded), its images prepared by transformers' own image processor."""
    import json

    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    engine = Engine(checkpoint, dtype="float32", warm_up=False)
    ids = encode_prompt(request, engine, Limits()).ids
    v = engine.config.vision
    inputs = {}
    if images:
        from PIL import Image

        raw = json.loads((checkpoint / "preprocessor_config.json").read_text())
        proc = Qwen2VLImageProcessorPil(**{k: x for k, x in raw.items() if k not in ("image_processor_type",
                                                                                      "processor_class")})
        out = proc([Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
        inputs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    if video is not None:
        inputs.update(pixel_values_videos=torch.from_numpy(video.values), video_grid_thw=torch.tensor([video.grid]))
    mm = [1 if t == v.image_token_id else 2 if t == v.video_token_id else 0 for t in ids]
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          mm_token_type_ids=torch.tensor([mm]), max_new_tokens=n, do_sample=False, **inputs)
    return out[0, len(ids):].tolist()


def _chat_request(content: list) -> prefill_pb2.PrefillRequest:
    from qwenpd.clients.chat_request import chat_message

    req = prefill_pb2.PrefillRequest()
    req.chat.messages.append(chat_message({"role": "user", "content": content}, 0))
    return req


@pytest.mark.parametrize("images", [[(0, 64, 64)], [(1, 40, 56), (2, 24, 24)]], ids=["one-image", "two-images"])
def test_chat_with_images_equals_transformers(served, checkpoint, images):
    data = [_png(seed, h, w) for seed, h, w in images]
    content = [{"type": "text", "text": "look:"}]
    for d in data:
        content += [{"type": "image_url", "image_url": {"url": _url(d), "detail": "auto"}},
                    {"type": "text", "text": " and"}]
    r = _chat(served, content)
    assert r.status_code == 200, r.text
    got = r.json()
    prefill = _chat_request(content)
    request = generate_pb2.GenerateRequest(chat=prefill.chat, sampling=common_pb2.SamplingParams(
        temperature=0, max_tokens=12))
    with grpc.insecure_channel(served.gateway) as ch:  # the same request over gRPC, for its token ids
        chunks = list(generate_pb2_grpc.GenerateServiceStub(ch).Generate(request, timeout=120))
    assert [t for c in chunks for t in c.token_ids] == _transformers_greedy(checkpoint, prefill, data, 12)
    assert got["choices"][0]["message"]["content"] == "".join(c.content for c in chunks)
    assert got["usage"]["prompt_tokens_details"]["image_tokens"] == sum(h * w // 64 for _, h, w in images)


def test_repeated_image_hits_the_prefix_cache_a_different_one_does_not(served, checkpoint):
    content = [{"type": "text", "text": "the same words before the picture, long enough for a block"},
               {"type": "image_url", "image_url": {"url": _url(_png(7))}}, {"type": "text", "text": "?"}]
    cold = _chat(served, content).json()
    warm = _chat(served, content).json()
    other = dict(content[1], image_url={"url": _url(_png(8))})
    different = _chat(served, [content[0], other, content[2]]).json()
    prompt = cold["usage"]["prompt_tokens"]
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt - 16  # all full blocks
    engine = Engine(checkpoint, dtype="float32", warm_up=False)
    ids = encode_prompt(_chat_request(content), engine, Limits()).ids
    image_start = ids.index(engine.config.vision.image_token_id)
    assert len(ids) == prompt
    assert 0 < different["usage"]["prompt_tokens_details"]["cached_tokens"] <= image_start // 16 * 16
    assert different["choices"][0]["message"]["content"] != cold["choices"][0]["message"]["content"]


def test_video_frames_over_grpc_equal_transformers(served, checkpoint):
    from PIL import Image

    from qwenpd.engine.media import ProcessorSpec, video_pixels

    frames = [_png(20 + i, 32, 48) for i in range(3)]
    media = common_pb2.Media(video=common_pb2.VideoFrames(frames=frames), fps=1.0)
    msg = common_pb2.ChatMessage(role="user", parts=[common_pb2.ContentPart(text="clip:"),
                                                     common_pb2.ContentPart(media=media)])
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    request = generate_pb2.GenerateRequest(chat=prefill_pb2.Chat(messages=[msg]), sampling=sampling)
    with grpc.insecure_channel(served.gateway) as ch:
        chunks = list(generate_pb2_grpc.GenerateServiceStub(ch).Generate(request, timeout=120))
    got = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].usage.image_tokens > 0
    spec = ProcessorSpec.from_checkpoint(checkpoint, 4, 2, 2)[1]
    video = video_pixels([Image.open(io.BytesIO(f)).convert("RGB") for f in frames], dataclasses.replace(spec, fps=1.0))
    prefill_req = prefill_pb2.PrefillRequest(chat=request.chat)
    assert got == _transformers_greedy(checkpoint, prefill_req, [], 10, video=video)


def test_image_stream_resumes_identically_after_decode_is_killed(served):
    def request(i):
        content = [common_pb2.ContentPart(text=f"picture {i}:"),
                   common_pb2.ContentPart(media=common_pb2.Media(image=_png(30 + i, 48, 48)))]
        msg = common_pb2.ChatMessage(role="user", parts=content)
        return generate_pb2.GenerateRequest(chat=prefill_pb2.Chat(messages=[msg]), sampling=common_pb2.SamplingParams(
            temperature=0 if i % 2 == 0 else 0.8, seed=40 + i, max_tokens=128, ignore_eos=True))

    requests = [request(i) for i in range(2)]  # a greedy and a sampled stream
    ref = _run(served.gateway, requests)
    got = _run(served.gateway, requests, kill=(_decode_pid(served, served.tmp), 0), kill_after_tokens=16)
    assert [r for _, _, r in got] == [1, 1], "every stream resumed once"
    for (ids, lps, _), (ref_ids, ref_lps, _) in zip(got, ref):
        assert ids == ref_ids and lps == ref_lps


def test_bad_images_are_refused_while_others_are_served(served):
    from PIL import Image

    good = [{"type": "text", "text": "fine"}, {"type": "image_url", "image_url": {"url": _url(_png(3))}}]
    results = {}

    def good_call():
        results["good"] = _chat(served, good, max_tokens=40)

    t = threading.Thread(target=good_call)
    t.start()
    bomb = io.BytesIO()
    Image.new("L", (1000, 1000)).save(bomb, "PNG")  # a few KB that decode to 1e6 pixels, over 250000
    cases = {
        "truncated": ([{"type": "image_url", "image_url": {"url": _url(_png(4)[:300])}}], "decode", None),
        "not an image": ([{"type": "image_url", "image_url": {"url": _url(b"hello")}}], "not a PNG image", None),
        "bomb": ([{"type": "image_url", "image_url": {"url": _url(bomb.getvalue())}}], "max-image-pixels", None),
        "too many": ([{"type": "image_url", "image_url": {"url": _url(_png(i, 16, 16))}} for i in range(4)],
                     "max-images-per-request", None),
        "http url": ([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}],
                     "allowed-media-domains", "messages[0].content[0].image_url"),
        "bad detail": ([{"type": "image_url", "image_url": {"url": _url(_png(5)), "detail": "ultra"}}], "detail",
                       "messages[0].content[0].detail"),
        "video file": ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}], "frames",
                       None),
    }
    for name, (content, words, param) in cases.items():
        r = _chat(served, content)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert words in err["message"], (name, err)
        assert err["param"].startswith(param or "messages[0].content["), (name, err)
    t.join(120)
    assert results["good"].status_code == 200
    with grpc.insecure_channel(served.gateway) as ch:
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        bad = generate_pb2.GenerateRequest(text="<|vision_start|><|image_pad|><|vision_end|>",
                                           media=[common_pb2.Media(image=b"\x89PNG broken")])
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(bad, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "media[0]" in err.value.details()
        missing = generate_pb2.GenerateRequest(text="no placeholder here", media=[common_pb2.Media(image=_png(1))])
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(missing, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "placeholder" in err.value.details()


def _scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.fixture(scope="module")
def pooled(checkpoint, tmp_path_factory):
    """serve all with prefill and decode at tp 2 and an encoder pool of one."""
    from tests.services.test_supervisor import _free_ports

    tmp = tmp_path_factory.mktemp("vision-pool")
    metrics = _free_ports(6)
    s = start_serve_all(checkpoint, tmp, f"vispool{os.getpid()}", "--prefill-tp", "2", "--decode-tp", "2",
                        "--encoders", "1", "--block-size", "16", "--snapshot-interval", "16", "--metrics-port",
                        str(metrics))
    s.tmp, s.metrics = tmp, metrics
    s.model = httpx.get(f"http://{s.http}/v1/models", timeout=30).json()["data"][0]["id"]
    yield s
    assert stop_serve_all(s) == 0


def test_tensor_parallel_services_with_an_encoder_pool(pooled, checkpoint):
    """Prefill and decode at tp 2, the tower on the encoder instance: transformers' greedy tokens; prefill read the
    embeddings from the cache store; the same prompt again hits the prefix cache (the snapshot's rope offset
    crosses the ranks too) with the same tokens, and the same image after other text is not encoded again."""
    from tests.services.test_exact_resume import _metric

    data = _png(11, 40, 40)
    content = [{"type": "text", "text": "twice:"}, {"type": "image", "image": data},
               {"type": "text", "text": "what?"}]
    prefill = _chat_request(content)
    request = generate_pb2.GenerateRequest(chat=prefill.chat, sampling=common_pb2.SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True))
    runs = []
    with grpc.insecure_channel(pooled.gateway) as ch:
        for _ in range(2):
            chunks = list(generate_pb2_grpc.GenerateServiceStub(ch).Generate(request, timeout=120))
            runs.append(([t for c in chunks for t in c.token_ids], chunks[-1].usage))
    assert runs[0][0] == runs[1][0] == _transformers_greedy(checkpoint, prefill, [data], 10)
    assert runs[0][1].cached_tokens == 0 and runs[1][1].cached_tokens >= runs[1][1].prompt_tokens - 16
    assert _metric(_scrape(pooled.metrics + 1), "qwenpd_prefill_stored_embeddings_total") == 1
    other = _chat(pooled, [{"type": "text", "text": "something else first, then"},
                           {"type": "image_url", "image_url": {"url": _url(data)}}])
    assert other.status_code == 200, other.text
    encoder = _scrape(pooled.metrics + 5)
    assert _metric(encoder, 'qwenpd_encoder_items_total{outcome="computed"}') == 1
    assert _metric(encoder, 'qwenpd_encoder_items_total{outcome="reused"}') == 2


def test_encoder_pool_errors_and_failure(pooled):
    """Bad media are named as the request names them; with the encoder killed, requests are still served
    (prefill runs the tower) with the same answer, and the supervisor brings the encoder back."""
    import json
    import signal
    import time

    bad = _chat(pooled, [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": _url(b"junk")}}])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].content[1]", bad.text
    content = [{"type": "text", "text": "kill:"}, {"type": "image_url", "image_url": {"url": _url(_png(22))}}]
    first = _chat(pooled, content)
    pid = json.loads((pooled.tmp / f"{pooled.store_id}.json").read_text())["children"]["encoder 0"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    again = _chat(pooled, content)  # the encoder is down: prefill runs the tower
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    deadline = time.monotonic() + 60
    while True:  # the supervisor restarts the encoder in place
        try:
            _scrape(pooled.metrics + 5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the encoder did not come back"
            time.sleep(0.5)
