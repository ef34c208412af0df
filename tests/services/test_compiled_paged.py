"""`serve all --compile --kv-cache-bytes`: compiled prefill and decode graphs over a fixed paged KV cache give the
in-process eager engine's tokens (one and several sequences at once), with speculation on (the verify passes of
the checkpoint's MTP head's drafts run the compiled decode regions: one sequence, and three drafting together);
decode refuses a sequence whose KV pages are not free (RESOURCE_EXHAUSTED, with a retry hint only when waiting can
help)."""

from __future__ import annotations

import concurrent.futures

import pytest

from qwenpd.clients import Client, ResourceExhausted
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from tests.services.conftest import start_serve_all, stop_serve_all

KV_BYTES = 1 << 20  # tiny: 32 KiB per 64-token page -> 31 usable pages, 1984 tokens


@pytest.fixture(scope="module")
def compiled_services(tiny_model_dir, tmp_path_factory):
    services = start_serve_all(tiny_model_dir, tmp_path_factory.mktemp("compiled"), "compiled", "--compile",
                               "--kv-cache-bytes", str(KV_BYTES), "--max-batch", "4", "--chunk-size", "64",
                               "--num-speculative-tokens", "3", "--speculative-max-batch", "4",
                               "--speculative-policy", "always")
    yield services
    stop_serve_all(services)


def _greedy(engine, ids, n):
    return generate(engine, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).token_ids


def test_compiled_services_give_the_eager_tokens(compiled_services, engine):
    prompts = [[5, 6, 7], [3 + (7 * i) % 500 for i in range(150)], list(range(40, 90))]
    with Client(prefill=compiled_services.prefill, decode=compiled_services.decode, timeout=120) as c:
        got = c.generate(token_ids=prompts[1], max_tokens=12, temperature=0, ignore_eos=True)
        assert got.token_ids == _greedy(engine, prompts[1], 12)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three at once: a padded batch bucket of 4
            futures = [pool.submit(c.generate, token_ids=p, max_tokens=10, temperature=0, ignore_eos=True)
                       for p in prompts]
            for p, f in zip(prompts, futures):
                assert f.result().token_ids == _greedy(engine, p, 10)


def test_decode_refuses_what_the_kv_cache_cannot_hold(compiled_services):
    with Client(prefill=compiled_services.prefill, decode=compiled_services.decode, timeout=120) as c:
        with pytest.raises(ResourceExhausted) as never:
            c.generate(token_ids=[5, 6, 7], max_tokens=2100, temperature=0, ignore_eos=True)
        assert "KV pages" in str(never.value) and never.value.retry_after_s is None
