"""Disaggregated output (client -> prefill -> cache store -> decode) against the in-process engine and
transformers, token for token, on the tiny model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwenpd.clients import AsyncClient, Client
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams

PROMPTS = {
    "text": "The quick brown fox jumps over the lazy dog.",
    "short": "Hi",
    "long": "Once upon a time there was a small model that wanted to answer every question. " * 12,
}


def reference(engine, prompt_ids, **kw) -> object:
    return generate(engine, prompt_ids, SamplingParams(**kw))


@pytest.fixture(scope="module")
def client(backend_services):
    """Every test here runs on both data planes: shm (one host) and mooncake (Mooncake Store over TCP)."""
    with Client(prefill=backend_services.prefill, decode=backend_services.decode, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import Qwen3_5ForCausalLM

    return Qwen3_5ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_equals_engine_and_transformers(client, engine, hf_model, name):
    ids = engine.tokenizer.encode(PROMPTS[name])
    got = client.generate(PROMPTS[name], max_tokens=24, temperature=0, ignore_eos=True)
    ref = reference(engine, ids, temperature=0, max_tokens=24, ignore_eos=True)
    assert got.token_ids == ref.token_ids
    assert got.text == ref.text
    assert (got.finish_reason, got.prompt_tokens, got.cached_tokens) == ("length", len(ids), 0)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert got.token_ids == out[0, len(ids):].tolist()


def test_token_id_prompt_and_chunked_prefill(client, engine):
    ids = [3 + (7 * i) % 500 for i in range(700)]  # > the default 512-token chunk: two chunks on the service
    got = client.generate(token_ids=ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert got.token_ids == reference(engine, ids, temperature=0, max_tokens=8, ignore_eos=True).token_ids


@pytest.mark.parametrize("seed", [0, 1234])
def test_seeded_sampling_equals_in_process(client, engine, seed):
    prompt = PROMPTS["text"]
    kw = dict(temperature=0.9, top_p=0.95, top_k=100, seed=seed, max_tokens=20, ignore_eos=True)
    got = client.generate(prompt, **kw)
    assert got.token_ids == reference(engine, engine.tokenizer.encode(prompt), **kw).token_ids
    assert client.generate(prompt, **kw).token_ids == got.token_ids  # and reproducible


def test_stop_conditions_equal_in_process(client, engine):
    prompt = PROMPTS["text"]
    ids = engine.tokenizer.encode(prompt)
    full = reference(engine, ids, temperature=0, max_tokens=24, ignore_eos=True)
    stop_id = full.token_ids[5]
    stop_text = full.text[4:7]
    for kw in (dict(stop_token_ids=(stop_id,)), dict(stop=(stop_text,))):
        ref = reference(engine, ids, temperature=0, max_tokens=24, ignore_eos=True, **kw)
        got = client.generate(prompt, temperature=0, max_tokens=24, ignore_eos=True,
                              **{k: list(v) for k, v in kw.items()})
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, "stop")
    eos = reference(engine, ids, temperature=0, max_tokens=24)  # EOS respected when not ignored
    got = client.generate(prompt, temperature=0, max_tokens=24)
    assert (got.token_ids, got.finish_reason) == (eos.token_ids, eos.finish_reason)


def test_max_tokens_one_is_the_prefill_token(client, engine):
    got = client.generate("Hi", temperature=0, max_tokens=1)
    assert got.token_ids == reference(engine, engine.tokenizer.encode("Hi"), temperature=0, max_tokens=1).token_ids
    assert got.finish_reason in ("length", "stop")


def test_chat_messages_use_the_template(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
    got = client.generate(messages=messages, temperature=0, max_tokens=12, ignore_eos=True)
    assert got.prompt_tokens == len(ids)
    assert got.token_ids == reference(engine, ids, temperature=0, max_tokens=12, ignore_eos=True).token_ids


def test_stream_chunks_add_up_to_generate(client):
    chunks = list(client.stream(PROMPTS["text"], temperature=0, max_tokens=16, ignore_eos=True))
    whole = client.generate(PROMPTS["text"], temperature=0, max_tokens=16, ignore_eos=True)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_16_concurrent_streams_equal_their_solo_output(backend_services, client):
    services = backend_services
    prompts = [f"Request {i}: " + "tokens and tensors " * (1 + i % 5) for i in range(16)]
    kw = dict(temperature=0, max_tokens=40, ignore_eos=True)
    solo = [client.generate(p, **kw).token_ids for p in prompts]
    peak = 0

    async def run() -> list[list[int]]:
        nonlocal peak
        async with AsyncClient(services.prefill, services.decode, timeout=60) as c:
            async def one(p: str) -> list[int]:
                return [t async for chunk in c.stream(p, **kw) for t in chunk.token_ids]

            tasks = [asyncio.ensure_future(one(p)) for p in prompts]
            while not all(t.done() for t in tasks):
                peak = max(peak, (await c.load()).active_sequences)
                await asyncio.sleep(0.005)
            return [t.result() for t in tasks]

    assert asyncio.run(run()) == solo
    assert peak > 1, "the streams never shared a batch"
