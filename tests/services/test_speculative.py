"""Speculative decoding through the services (issue 25): `serve all --num-speculative-tokens 3` on a checkpoint
made by transformers with an MTP head added. Prefill hands decode the head's state with the model state, decode
drafts from its first step; every stream, alone or among others, greedy or seeded sampling, and after a kill -9
of decode, is the in-process plain decoding of the same checkpoint, token for token and logprob for logprob.
Opting out, a hand-off without the draft state, and a checkpoint without a head get their clear errors.
(The head here is random, so its drafts are rejected: tests/decode_service/test_speculative_runner.py checks
accepted drafts, every accept/reject pattern, in the stepping loop itself.) Decode runs the default adaptive
policy (decode_service/policy.py): it drafts while it measures, finds that drafting does not pay for this head and
steps plainly, the heads reading their input late; resume points carry the heads' state all the same.
tests/services/test_compiled_paged.py and test_tensor_parallel.py draft at every step (--speculative-policy
always)."""

from __future__ import annotations

import os
import subprocess
import urllib.request

import grpc
import httpx
import pytest
import torch

from qwenpd.clients import Client
from qwenpd.engine import Engine
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc, generate_pb2, prefill_pb2
from qwenpd.protos.qwenpd.v1 import prefill_pb2_grpc
from tests.hf_models import save_hf_checkpoint, with_mtp_head
from tests.services.conftest import qwenpd_cmd, start_serve_all, stop_serve_all
from tests.services.test_exact_resume import _decode_pid, _metric, _run
from tests.services.test_supervisor import _free_ports

TOKENS = 200  # long enough that no stream ends before the kill -9 lands (the slowest stream has 12 tokens)
STREAMS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec-ckpt")
    plain = save_hf_checkpoint(tmp / "plain", "text", seed=3)
    return plain, with_mtp_head(plain, tmp / "with_head")


@pytest.fixture(scope="module")
def spec(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec-serve")
    metrics = _free_ports(5)
    s = start_serve_all(checkpoints[1], tmp, f"spec{os.getpid()}", "--num-speculative-tokens", "3",
                        "--speculative-max-batch", str(STREAMS),
                        "--decode-checkpoint-every", "48", "--resume-wait", "120", "--metrics-port", str(metrics))
    s.metrics, s.tmp = metrics, tmp
    yield s
    assert stop_serve_all(s) == 0


def _requests() -> list[generate_pb2.GenerateRequest]:
    out = []
    for i in range(STREAMS):
        sampling = common_pb2.SamplingParams(temperature=0 if i % 2 == 0 else 0.9, seed=500 + i, max_tokens=TOKENS,
                                             ignore_eos=True)
        prompt = [(11 * i + 7 * j) % 290 + 1 for j in range(9 + 31 * i)]
        out.append(generate_pb2.GenerateRequest(token_ids=prefill_pb2.TokenIds(ids=prompt), sampling=sampling))
    return out


@pytest.fixture(scope="module")
def engine(checkpoints):
    return Engine(checkpoints[1])


@pytest.fixture(scope="module")
def reference(engine):
    """In-process plain decoding of every request."""
    out = []
    for r in _requests():
        params = SamplingParams(temperature=r.sampling.temperature, seed=r.sampling.seed, max_tokens=TOKENS,
                                ignore_eos=True)
        g = generate(engine, list(r.token_ids.ids), params)
        out.append((g.token_ids, g.logprobs))
    return out


def _decode_metrics(s) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{s.metrics + 2}/metrics", timeout=10).read().decode()


def test_streams_alone_and_batched_are_plain_decoding(spec, reference):
    requests = _requests()
    together = _run(spec.gateway, requests)
    assert [(ids, lps) for ids, lps, _ in together] == reference
    alone = _run(spec.gateway, requests[1:2])
    assert alone[0][:2] == reference[1]
    scrape = _decode_metrics(spec)
    assert _metric(scrape, "qwenpd_decode_draft_tokens_total") > 0
    assert _metric(scrape, "qwenpd_decode_drafting_steps_total") > 0
    assert 'qwenpd_decode_accepted_draft_tokens_total{position="3"}' in scrape
    assert _metric(scrape, "qwenpd_decode_mean_accepted_length") >= 1
    assert _metric(scrape, "qwenpd_decode_plain_steps_total") > 0  # the policy stopped drafting for this head
    assert 0 <= _metric(scrape, "qwenpd_decode_draft_acceptance") < 0.5


def test_kill9_of_decode_resumes_speculating_streams_exactly(spec, reference):
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the previous test's streams have left the batch
        if _metric(_decode_metrics(spec), "qwenpd_decode_active_sequences") == 0:
            break
        time.sleep(0.1)
    got = _run(spec.gateway, _requests(), kill=(_decode_pid(spec, spec.tmp), 0), kill_after_tokens=12)
    assert [r for _, _, r in got] == [1] * STREAMS, "not every stream resumed once"
    assert [(ids, lps) for ids, lps, _ in got] == reference
    # the restarted decode service ran the head for the resumed streams (their resume points carried its state):
    # it drafted, or its adaptive policy, fresh in the new process, scored this random head's drafts while the
    # streams replayed and stepped plainly (steps of a batch with heads that drafted nothing)
    scrape = _decode_metrics(spec)
    assert _metric(scrape, "qwenpd_decode_draft_tokens_total") + _metric(scrape, "qwenpd_decode_plain_steps_total") > 0


def test_opting_out_decodes_without_drafts(spec, reference):
    request = _requests()[0]
    before = _metric(_decode_metrics(spec), "qwenpd_decode_draft_tokens_total")
    with Client(prefill=spec.prefill, decode=spec.decode, timeout=60) as client:
        out = client.generate(token_ids=list(request.token_ids.ids), max_tokens=TOKENS, temperature=0,
                              ignore_eos=True, speculative=False)
    assert (out.token_ids, out.logprobs) == reference[0]
    assert _metric(_decode_metrics(spec), "qwenpd_decode_draft_tokens_total") == before
    body = {"model": httpx.get(f"http://{spec.http}/v1/models").json()["data"][0]["id"],
            "prompt": list(request.token_ids.ids), "max_tokens": 8, "temperature": 0, "speculative": False}
    r = httpx.post(f"http://{spec.http}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert _metric(_decode_metrics(spec), "qwenpd_decode_draft_tokens_total") == before
    r = httpx.post(f"http://{spec.http}/v1/completions", json={**body, "speculative": "no"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative"


def test_a_handoff_without_draft_state_is_failed_precondition_and_stays_usable(spec, reference):
    request = _requests()[0]
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, speculative=False)
    with grpc.insecure_channel(spec.prefill) as ch:
        done = prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(
            prefill_pb2.PrefillRequest(token_ids=request.token_ids, sampling=sampling), timeout=60)
    with grpc.insecure_channel(spec.decode) as ch:
        stub = decode_pb2_grpc.DecodeServiceStub(ch)
        wants_drafts = common_pb2.SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, speculative=True)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Decode(decode_pb2.DecodeRequest(checkpoint_id=done.checkpoint_id, sampling=wants_drafts),
                             timeout=60))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "draft state" in info.value.details()
        ids, lps = [], []
        for chunk in stub.Decode(decode_pb2.DecodeRequest(checkpoint_id=done.checkpoint_id), timeout=60):
            ids += chunk.token_ids
            lps += chunk.logprobs
    assert (ids, lps) == reference[0]


def test_a_checkpoint_without_a_head_is_a_usage_error(checkpoints):
    done = subprocess.run(qwenpd_cmd("serve", "decode", "--model", str(checkpoints[0]), "--cache", "127.0.0.1:1",
                                     "--num-speculative-tokens", "2"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "mtp" in done.stderr and "no MTP head" in done.stderr


def _handoff(spec, engine, prompt: list[int], salt: str | None = None):
    """Prefill `prompt` (greedy, 24 tokens); the response and the hand-off checkpoint's tensors."""
    from qwenpd.cache_store.client import CacheStoreClient
    from qwenpd.engine import state_spec

    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    request = prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=prompt), sampling=sampling)
    if salt is not None:
        request.cache_salt = salt
    with grpc.insecure_channel(spec.prefill) as ch:
        done = prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(request, timeout=60)
    with CacheStoreClient(spec.cache) as store:
        with store.checkpoint(done.checkpoint_id, engine.fingerprint,
                              lambda n: state_spec.handoff_shapes(engine.config, n),
                              state_spec.handoff_dtypes(engine.config, engine.dtype)) as ckpt:
            tensors = {name: t.clone() for name, t in ckpt.tensors.items()}
    return done, tensors


def test_a_prefix_cache_hit_hands_off_the_draft_state_of_a_cold_prefill(spec, engine):
    """The head's KV per block and its hidden state per snapshot are cached with the model state: a warm
    request's hand-off carries the same draft state, bit for bit, as the same prompt computed cold, and decodes
    to plain decoding's tokens."""
    base = [(5 * j) % 290 + 1 for j in range(600)]
    other = base[:540] + [(3 * j) % 290 + 1 for j in range(40)]
    _handoff(spec, engine, base)  # caches two blocks and the snapshot at 512
    warm, warm_tensors = _handoff(spec, engine, other)
    cold, cold_tensors = _handoff(spec, engine, other, salt="cold")
    assert (warm.cached_tokens, cold.cached_tokens) == (512, 0)
    drafts = sorted(n for n in cold_tensors if n.startswith("mtp."))
    assert drafts == ["mtp.0.k", "mtp.0.v", "mtp.hidden"]
    assert cold_tensors["mtp.0.k"].shape[1] == len(other) - 1
    for name in drafts:
        assert torch.equal(warm_tensors[name], cold_tensors[name]), name
    ref = generate(engine, other, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    with grpc.insecure_channel(spec.decode) as ch:
        stub = decode_pb2_grpc.DecodeServiceStub(ch)
        for done in (warm, cold):
            ids = [t for c in stub.Decode(decode_pb2.DecodeRequest(checkpoint_id=done.checkpoint_id), timeout=60)
                   for t in c.token_ids]
            assert ids == ref.token_ids
