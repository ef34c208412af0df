"""Bad requests get the right status naming the field; other models' and unknown checkpoints are refused;
the services keep serving afterwards."""

from __future__ import annotations

import math
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenpd.clients import Client, FailedPrecondition, InvalidArgument, NotFound
from qwenpd.clients.errors import from_rpc_error
from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.services.conftest import model_service_flags, qwenpd_cmd, wait_ready_file

MAX_CONTEXT = 8192  # the tiny preset

BAD = {
    "empty-text": (dict(prompt=""), "text"),
    "empty-ids": (dict(token_ids=[]), "token_ids.ids"),
    "empty-chat": (dict(messages=[]), "chat.messages"),
    "id-ge-vocab": (dict(token_ids=[1, 2, 512]), "token_ids.ids"),
    "too-long": (dict(token_ids=[5] * (MAX_CONTEXT + 1)), "token_ids.ids"),
    "temperature-neg": (dict(prompt="hi", temperature=-0.5), "sampling.temperature"),
    "temperature-nan": (dict(prompt="hi", temperature=math.nan), "sampling.temperature"),
    "top-p-zero": (dict(prompt="hi", top_p=0.0), "sampling.top_p"),
    "top-p-big": (dict(prompt="hi", top_p=1.5), "sampling.top_p"),
    "max-tokens-zero": (dict(prompt="hi", max_tokens=0), "sampling.max_tokens"),
    "stop-empty": (dict(prompt="hi", stop=[""]), "sampling.stop"),
    "stop-id-ge-vocab": (dict(prompt="hi", stop_token_ids=[9999]), "sampling.stop_token_ids"),
    "speculative-where-none-runs": (dict(prompt="hi", speculative=True), "sampling.speculative"),
}


@pytest.mark.parametrize("kwargs,field", list(BAD.values()), ids=list(BAD))
def test_invalid_argument_names_the_field(client, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        client.generate(**kwargs)
    assert info.value.field == field
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_still_serving_after_bad_requests(services, client):
    for kwargs, _ in BAD.values():
        with pytest.raises(InvalidArgument):
            client.generate(**kwargs)
    for address in (services.cache, services.prefill, services.decode):
        with grpc.insecure_channel(address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    assert client.generate("still here", max_tokens=3, temperature=0).token_ids


def _decode(address: str, checkpoint_id: str) -> list:
    with grpc.insecure_channel(address) as ch:
        try:
            return list(decode_pb2_grpc.DecodeServiceStub(ch).Decode(
                decode_pb2.DecodeRequest(checkpoint_id=checkpoint_id), timeout=30))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def test_unknown_checkpoint_is_not_found(services):
    with pytest.raises(NotFound):
        _decode(services.decode, "no-such-checkpoint")
    with pytest.raises(InvalidArgument) as info:
        _decode(services.decode, "")
    assert info.value.field == "checkpoint_id"


@pytest.mark.parametrize("other", ["another seed", "--quantize fp8"])
def test_checkpoint_of_another_model_is_refused(services, store, tmp_path, tiny_model_dir, other):
    """A second prefill service shares the cache store, on another tiny seed or on the same weights quantized at
    load (which compute differently); decode refuses its checkpoint."""
    from qwenpd.engine.init_model import init_model

    model, flags = ((init_model(tmp_path / "other", "tiny", seed=1), ()) if other == "another seed"
                    else (tiny_model_dir, ("--quantize", "fp8")))
    ready = tmp_path / "other-prefill.json"
    proc = subprocess.Popen(qwenpd_cmd("serve", "prefill", "--model", str(model), "--cache", services.cache,
                                       "--threads", "1", "--ready-file", str(ready), "--log-level", "WARNING",
                                       *model_service_flags(), *flags))
    try:
        address = wait_ready_file(ready, proc)["address"]
        with grpc.insecure_channel(address) as ch:
            response = prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(
                prefill_pb2.PrefillRequest(text="hello from another model"), timeout=30)
        with pytest.raises(FailedPrecondition) as info:
            _decode(services.decode, response.checkpoint_id)
        assert "model" in info.value.message
        with Client(prefill=address, decode=services.decode, timeout=30) as c, pytest.raises(FailedPrecondition):
            c.generate("and through the client", max_tokens=4)
        store.delete(response.checkpoint_id)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
