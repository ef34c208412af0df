"""Quantized weights through real services (issue 27): `serve all --quantize int8` and a fine-grained FP8 checkpoint
each give the in-process engine's tokens on the same weights, cold, on a prefix-cache hit, and decoded in a batch
of concurrent streams."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qwenpd.clients import Client
from qwenpd.engine import Engine
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from tests.engine.test_fp8 import _fp8_checkpoint
from tests.services.conftest import start_serve_all, stop_serve_all

GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", ["int8", "fp8-checkpoint"])
def test_quantized_weights_through_serve_all(kind, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"quantized_{kind}")
    if kind == "int8":
        model, flags, engine = tiny_model_dir, ("--quantize", "int8"), Engine(tiny_model_dir, quantize="int8")
    else:
        model, _ = _fp8_checkpoint(tiny_model_dir, tmp / "fp8", "fp8")
        flags, engine = (), Engine(model)
    s = start_serve_all(model, tmp, f"quantized{kind.replace('-', '')}{os.getpid()}", "--block-size", "16",
                        "--snapshot-interval", "64", *flags)
    try:
        with Client(prefill=s.prefill, decode=s.decode, timeout=60) as client:
            system = _ids(100, seed=1)
            a, b = system + _ids(35, seed=2), system + _ids(20, seed=3)
            ra = client.generate(token_ids=a, **GREEDY)
            rb = client.generate(token_ids=b, **GREEDY)
            assert (ra.cached_tokens, rb.cached_tokens) == (0, 64)  # b restores a's state at the snapshot
            for ids, got in ((a, ra), (b, rb)):
                assert got.token_ids == generate(engine, ids, SamplingParams(**GREEDY)).token_ids
            prompts = [system + _ids(10 + i, seed=10 + i) for i in range(4)]
            with ThreadPoolExecutor(4) as pool:  # decoded together, each from a prefix hit
                outs = list(pool.map(lambda ids: client.generate(token_ids=ids, **SAMPLED), prompts))
            for ids, got in zip(prompts, outs):
                assert got.cached_tokens > 0
                assert got.token_ids == generate(engine, ids, SamplingParams(**SAMPLED)).token_ids
    finally:
        assert stop_serve_all(s) == 0
