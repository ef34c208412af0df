"""The gateway on real processes (the session's serve-all stack behind a `qwenpd serve gateway`): gRPC Generate,
the OpenAI-compatible HTTP API through the official `openai` SDK, bad inputs, and cancellation freeing slots."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest
import torch

from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc, prefill_pb2
from tests.services.gateway_proc import start_gateway, wait_idle

PROMPT = "The quick brown fox jumps over the lazy dog."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_name(gateway):
    return httpx.get(f"{gateway.base_url}/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def oai(gateway):
    with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway.address) as ch:
        yield generate_pb2_grpc.GenerateServiceStub(ch)


def _generate(stub, timeout: float = 60, **fields) -> tuple[list[generate_pb2.GenerateChunk], list[int], str]:
    chunks = list(stub.Generate(generate_pb2.GenerateRequest(**fields), timeout=timeout))
    return chunks, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)


# ---- gRPC Generate -----------------------------------------------------------------------------------------------
def test_grpc_generate_greedy_equals_client_and_transformers(stub, client, engine, tiny_model_dir):
    from transformers import Qwen3_5ForCausalLM

    chunks, ids, text = _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(**GREEDY))
    ref = client.generate(PROMPT, **GREEDY)
    assert (ids, text) == (ref.token_ids, ref.text)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    hf = Qwen3_5ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ids == out[0, len(prompt_ids):].tolist()
    last = chunks[-1]
    assert chunks[0].request_id and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), 24)
    assert last.timings.ttft_ns > 0 and last.timings.tpot_ns > 0 and last.timings.resumes == 0
    assert sum(len(c.logprobs) for c in chunks) == 24


def test_grpc_generate_token_ids_and_chat_equal_the_client(stub, client):
    ids = [3 + (7 * i) % 500 for i in range(40)]
    _, got, _ = _generate(stub, token_ids=prefill_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(**GREEDY))
    assert got == client.generate(token_ids=ids, **GREEDY).token_ids
    chat = prefill_pb2.Chat(messages=[common_pb2.ChatMessage(**m) for m in CHAT])
    _, got, text = _generate(stub, chat=chat, sampling=common_pb2.SamplingParams(**GREEDY))
    ref = client.generate(messages=CHAT, **GREEDY)
    assert (got, text) == (ref.token_ids, ref.text)


def test_grpc_generate_seeded_sampling_and_salt(stub, client):
    sampling = common_pb2.SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    _, a, _ = _generate(stub, text=PROMPT, sampling=sampling, cache_salt="tenant-a")
    _, b, _ = _generate(stub, text=PROMPT, sampling=sampling)
    assert a == b == client.generate(PROMPT, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True).token_ids


def test_grpc_errors_are_mapped_and_the_gateway_stays_up(stub, gateway):
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, sampling=common_pb2.SamplingParams(max_tokens=4))  # no prompt
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, token_ids=prefill_pb2.TokenIds(ids=[10**9]))  # outside the vocabulary (prefill says so)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(gateway.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetModelInfo(prefill_pb2.GetModelInfoRequest(), timeout=5)
    assert info.vocab_size > 0
    assert info.model_name and not info.model_path  # the server's filesystem path is not disclosed
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(gateway.address) as ch:  # what a stub in another language discovers
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "qwenpd.v1.GenerateService" in db.get_services()
        assert db.FindFileContainingSymbol("qwenpd.v1.GenerateService").name == "qwenpd/v1/generate.proto"


def test_grpc_cancel_frees_the_decode_slot(stub, services):
    call = stub.Generate(generate_pb2.GenerateRequest(text=PROMPT, sampling=common_pb2.SamplingParams(
        temperature=0, max_tokens=4000, ignore_eos=True)), timeout=60)
    for i, _ in enumerate(call):
        if i == 2:
            break
    call.cancel()
    assert wait_idle(services.decode, timeout=3.0) < 3.0


# ---- OpenAI HTTP API through the official SDK -------------------------------------------------------------------
def test_completions_greedy_equals_the_client(oai, model_name, client):
    r = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, temperature=0,
                               extra_body={"ignore_eos": True})
    ref = client.generate(PROMPT, **GREEDY)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, 24)
    assert r.usage.prompt_tokens_details.cached_tokens == ref.cached_tokens
    r = oai.completions.create(model=model_name, prompt=[5, 6, 7, 8], max_tokens=5, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == client.generate(token_ids=[5, 6, 7, 8], **{**GREEDY, "max_tokens": 5}).text


def test_chat_completions_use_the_chat_template(oai, model_name, client, engine):
    r = oai.chat.completions.create(model=model_name, messages=CHAT, max_completion_tokens=12, temperature=0,
                                    logprobs=True, extra_body={"ignore_eos": True})
    ref = client.generate(messages=CHAT, **{**GREEDY, "max_tokens": 12})
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    lps = r.choices[0].logprobs.content
    assert len(lps) == 12 and [bytes(t.bytes) for t in lps] == [engine.tokenizer.token_bytes(i) for i in ref.token_ids]
    assert [t.logprob for t in lps] == pytest.approx(ref.logprobs)


def test_streaming_with_usage_equals_the_whole_answer(oai, model_name):
    whole = oai.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, temperature=0,
                                        extra_body={"ignore_eos": True})
    stream = oai.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    events = list(stream)
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert events[0].choices[0].delta.role == "assistant"
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 20
    assert all(e.usage is None for e in events[:-1])
    completion = list(oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True}))
    assert completion[-1].choices[0].finish_reason == "length"


def test_stop_strings(oai, model_name, client):
    ref = client.generate(PROMPT, **GREEDY)
    stop = ref.text[len(ref.text) // 2: len(ref.text) // 2 + 3]
    r = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == ref.text[:ref.text.index(stop)]


def test_seed_reproducibility_and_n(oai, model_name):
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    two = oai.completions.create(n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == a.choices[0].text  # choice 0 keeps the seed; choice i uses seed + i
    assert two.choices[1].text != two.choices[0].text
    assert two.usage.completion_tokens == 24 and two.usage.prompt_tokens == a.usage.prompt_tokens
    streamed = list(oai.completions.create(n=2, stream=True, **kw))
    for i in range(2):
        assert "".join(e.choices[0].text for e in streamed if e.choices and e.choices[0].index == i) == \
            two.choices[i].text


def test_typed_errors(oai, model_name):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model_name, messages=CHAT, logprobs=True, top_logprobs=21)  # past 20
    assert "top_logprobs" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model_name, prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError):  # past the model's context: prefill refuses it
        oai.completions.create(model=model_name, prompt=[7] * 200_000, max_tokens=2)


@pytest.mark.parametrize("body,status", [
    pytest.param(b"{not json", 400, id="bad-json"),
    pytest.param(b"[1, 2]", 400, id="not-an-object"),
    pytest.param({"prompt": "x"}, 400, id="no-model"),
    pytest.param({"model": "MODEL"}, 400, id="no-prompt"),
    pytest.param({"model": "MODEL", "prompt": "x", "max_tokens": "8"}, 400, id="max-tokens-string"),
    pytest.param({"model": "MODEL", "prompt": "x", "temperature": True}, 400, id="temperature-bool"),
    pytest.param({"model": "MODEL", "prompt": "x", "stop": ["a", 3]}, 400, id="stop-int"),
    pytest.param({"model": "MODEL", "prompt": [1, "a"]}, 400, id="mixed-prompt"),
    pytest.param({"model": "MODEL", "prompt": "x", "n": 0}, 400, id="n-zero"),
    pytest.param({"model": "MODEL", "prompt": "x", "logprobs": 21}, 400, id="top-logprobs-past-20"),
    pytest.param({"model": "MODEL", "prompt": "x", "tools": [{"type": "function"}]}, 400, id="tools"),
    pytest.param({"model": "other", "prompt": "x"}, 404, id="unknown-model"),
    pytest.param({"model": "MODEL", "prompt": "x" * 70_000_000}, 413, id="huge-body"),
])
def test_bad_http_inputs_get_4xx_json_and_the_gateway_stays_up(gateway, model_name, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).replace('"MODEL"', json.dumps(model_name)).encode()
    r = httpx.post(f"{gateway.base_url}/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{gateway.base_url}/completions", json={"model": model_name, "prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200
    assert httpx.get(f"http://{gateway.http}/health").json()["status"] == "ok"


def test_http_disconnect_frees_the_decode_slot(gateway, model_name, services):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{gateway.base_url}/completions", json=body) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break
    assert wait_idle(services.decode, timeout=3.0) < 3.0
    with pytest.raises(httpx.ReadTimeout):  # a whole answer, abandoned by its caller
        httpx.post(f"{gateway.base_url}/completions", json={**body, "stream": False}, timeout=1.0)
    assert wait_idle(services.decode, timeout=3.0) < 3.0


def test_bearer_token_and_no_backend(services, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    g = start_gateway(tmp_path, [services.prefill], [services.decode], "--auth-token-file", str(token))
    try:
        with openai.OpenAI(base_url=g.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=g.base_url, api_key="s3cret", max_retries=0) as good:
            assert good.models.list().data[0].id
        assert httpx.get(f"http://{g.http}/health").status_code == 200  # open, like gRPC health
    finally:
        assert g.stop() == 0
    down = start_gateway(tmp_path, ["127.0.0.1:9"], ["127.0.0.1:9"])  # nothing listens there
    try:
        assert httpx.get(f"http://{down.http}/health").status_code == 503
        r = httpx.post(f"{down.base_url}/completions", json={"model": "m", "prompt": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_backend"
    finally:
        assert down.stop() == 0


def test_full_backends_are_429_with_retry_after_and_deadlines_504(services, tmp_path, model_name):
    g = start_gateway(tmp_path, [services.prefill], [services.decode], "--max-in-flight-decode", "1",
                      "--timeout", "5")
    long = {"model": model_name, "prompt": PROMPT, "max_tokens": 8000, "temperature": 0, "ignore_eos": True}
    try:
        with openai.OpenAI(base_url=g.base_url, api_key="x", max_retries=0) as c, httpx.Client(timeout=60) as h:
            with h.stream("POST", f"{g.base_url}/completions", json={**long, "stream": True}) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()  # kept: dropping it would close the stream
                next(lines)  # the one decode slot we may use is taken (for the 5 s deadline)
                with pytest.raises(openai.RateLimitError) as err:
                    c.completions.create(model=model_name, prompt="x", max_tokens=2)
            assert int(err.value.response.headers["retry-after"]) >= 1
        wait_idle(services.decode)
        r = httpx.post(f"{g.base_url}/completions", json=long, timeout=60)  # ~8000 tokens: longer than 5 s
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    finally:
        assert g.stop() == 0


def test_logit_bias_and_min_p_hold_across_the_hand_off(stub):
    """Prefill samples the first token and decode the rest: a bias that forces a token forces every one of them,
    and min_p = 1 keeps only the most likely token (greedy's choice) at any temperature."""
    forced = common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={42: 100.0})
    _, ids, _ = _generate(stub, text=PROMPT, sampling=forced)
    assert ids == [42] * 6
    greedy = common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    top = common_pb2.SamplingParams(temperature=1.5, max_tokens=6, ignore_eos=True, min_p=1.0, seed=7)
    assert _generate(stub, text=PROMPT, sampling=top)[1] == _generate(stub, text=PROMPT, sampling=greedy)[1]


def test_min_tokens_across_the_hand_off(stub):
    """EOS forced by a bias still waits for min_tokens: prefill's token and decode's first ones are held back."""
    eos = stub.GetModelInfo(prefill_pb2.GetModelInfoRequest(), timeout=5).eos_token_ids[0]
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4, logit_bias={eos: 100.0})
    chunks, ids, _ = _generate(stub, text=PROMPT, sampling=sampling)
    assert len(ids) == 5 and eos not in ids[:4] and ids[4] == eos
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP


def test_penalties_across_the_hand_off_equal_the_in_process_engine(stub, engine):
    """Decode counts prefill's first token: penalized greedy decoding through the split gives the tokens the
    in-process loop gives."""
    from qwenpd.engine.generate import generate
    from qwenpd.engine.sampling import SamplingParams

    opts = dict(temperature=0.0, max_tokens=16, ignore_eos=True, presence_penalty=0.4, frequency_penalty=1.2)
    _, ids, _ = _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(**opts))
    ref = generate(engine, engine.tokenizer.encode(PROMPT), SamplingParams(**opts))
    plain = _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(**GREEDY))[1]
    assert ids == ref.token_ids and ids[:16] != plain[:16]  # the penalties changed the output, the same way


def test_top_logprobs_across_the_hand_off(oai, model_name, stub):
    """The most likely tokens at each position, prefill's first token included, in OpenAI's shapes and in
    GenerateChunk: greedy picks the first candidate, whose log-probability is the chosen token's."""
    chat = oai.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob for e in content)
    comp = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    assert [len(t) for t in comp.choices[0].logprobs.top_logprobs] == [2] * 5
    chunks, ids, _ = _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=5, ignore_eos=True, top_logprobs=4))
    tops = [t for c in chunks for t in c.top_logprobs]
    assert len(tops) == len(ids) == 5 and [t.candidates[0].id for t in tops] == ids
    assert all(len(t.candidates) == 4 and t.candidates[0].text for t in tops)


def test_logprob_tokens_are_each_tokens_own_bytes(oai, model_name, stub, engine):
    """Every logprobs entry is its own token's: its bytes are the tokenizer's bytes of that id (a token holding
    part of a character is `bytes:\\xNN` with those bytes, never "" or U+FFFD), and the tokens' bytes concatenate
    to the output's, in the completions and chat shapes and in GenerateChunk.token_bytes."""
    from qwenpd.tokens import token_text

    tok = engine.tokenizer
    comp = oai.completions.create(model=model_name, prompt="héllo — 日本 🙂", max_tokens=24, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    choice = comp.choices[0]
    assert len(choice.logprobs.tokens) == 24
    assert all(t and "\ufffd" not in t for t in choice.logprobs.tokens)
    chunks, ids, text = _generate(stub, text="héllo — 日本 🙂", sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, token_bytes=True, top_logprobs=2))
    got = [b for c in chunks for b in c.token_bytes]
    assert got == [tok.token_bytes(i) for i in ids]
    # the text as streamed (a character cut off by max_tokens is not emitted)
    assert b"".join(got).decode("utf-8", "replace").rstrip("\ufffd") == text.rstrip("\ufffd")
    assert choice.logprobs.tokens == [token_text(b) for b in got]  # the same greedy tokens over HTTP
    assert all(c.bytes == tok.token_bytes(c.id) for c in chunks[0].top_logprobs[0].candidates)
    offsets = choice.logprobs.text_offset  # characters of the text before each token
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(choice.text)
    chat = oai.chat.completions.create(model=model_name, messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert all(e.token == token_text(bytes(e.bytes)) for e in content)
    assert all(t.token == token_text(bytes(t.bytes)) for e in content for t in e.top_logprobs)


def test_repetition_penalty_across_the_hand_off_equals_the_in_process_engine(oai, model_name, stub, engine):
    """repetition_penalty counts the prompt's tokens (decode gets them in the hand-off) and the generated ones:
    through the split it gives the in-process loop's tokens, and it changed them; out of range is a 400."""
    from qwenpd.engine.generate import generate
    from qwenpd.engine.sampling import SamplingParams

    opts = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    _, ids, _ = _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(repetition_penalty=1.8, **opts))
    ref = generate(engine, engine.tokenizer.encode(PROMPT), SamplingParams(repetition_penalty=1.8, **opts))
    plain = _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(**opts))[1]
    assert ids == ref.token_ids and ids != plain
    comp = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    assert comp.choices[0].text == ref.text
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, extra_body={"repetition_penalty": 0})
    assert err.value.body["param"] == "repetition_penalty"
    with pytest.raises(grpc.RpcError) as rpc:
        _generate(stub, text=PROMPT, sampling=common_pb2.SamplingParams(repetition_penalty=-1.0, **opts))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty" in rpc.value.details()


def test_completions_echo_scores_the_prompt_like_transformers(oai, model_name, gateway, services, engine,
                                                              tiny_model_dir):
    """lm-evaluation-harness's multiple-choice call (echo, logprobs 1, max_tokens 1): the text starts with the prompt,
    the first token's log-probability is null, and the others are transformers' log_softmax of its logits on the
    same checkpoint; streamed, the prompt comes first; a token-id prompt echoes its text; Prefill refuses a
    prompt_logprobs past 20 naming it."""
    from transformers import Qwen3_5ForCausalLM

    from qwenpd.tokens import token_text

    prompt_ids = engine.tokenizer.encode(PROMPT)
    comp = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                  echo=True)
    c = comp.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPT) and len(lp.tokens) == len(prompt_ids) + 1
    assert lp.tokens[:-1] == [token_text(engine.tokenizer.token_bytes(i)) for i in prompt_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    hf = Qwen3_5ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt_ids])).logits[0].float(), -1)
    want = ref[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[1:-1] == pytest.approx(want, abs=1e-4)
    assert lp.text_offset[:len(prompt_ids)] == sorted(lp.text_offset[:len(prompt_ids)])
    assert lp.text_offset[-1] == len(PROMPT) and comp.usage.prompt_tokens == len(prompt_ids)
    plain = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    events = list(oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert events[0].choices[0].text == PROMPT
    assert "".join(e.choices[0].text for e in events) == PROMPT + plain.choices[0].text
    ids_echo = oai.completions.create(model=model_name, prompt=prompt_ids, max_tokens=2, temperature=0, echo=True,
                                      extra_body={"ignore_eos": True})
    assert ids_echo.choices[0].text.startswith(PROMPT)
    with grpc.insecure_channel(services.prefill) as ch:
        from qwenpd.protos.qwenpd.v1 import prefill_pb2_grpc

        with pytest.raises(grpc.RpcError) as err:
            prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(prefill_pb2.PrefillRequest(
                text=PROMPT, prompt_logprobs=21), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in err.value.details()


def test_the_python_client_offers_tools_and_parses_chat_output(client):
    """Client.generate with messages: tools and template arguments reach the template, and the Result has the
    text parsed (content; tool calls only when tools were offered)."""
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                   "properties": {}}}}]
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "noon"}]
    plain = client.generate(messages=messages, max_tokens=8, temperature=0)
    offered = client.generate(messages=messages, max_tokens=8, temperature=0, tools=tools,
                              chat_template_kwargs={"enable_thinking": False})
    assert plain.content == plain.text and not plain.tool_calls
    assert offered.prompt_tokens > plain.prompt_tokens  # the tools and the closed reasoning are in the prompt
    assert not offered.reasoning  # enable_thinking false: the template closed it
    with pytest.raises(ValueError, match="messages"):
        client.generate("text prompt", tools=tools)
