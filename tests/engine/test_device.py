"""The engine on other torch devices: `meta` (shapes only) proves nothing in a whole prefill + decode assumes
CPU; device names and NeuronCore lists are validated."""

from __future__ import annotations

import os

import pytest
import torch

from qwenpd.engine import DecodeBatch, Engine
from qwenpd.engine.device import parse_cores, resolve_device, set_neuron_cores


def _all_tensors(state):
    cache = state.kv.cache
    return [*cache.k, *cache.v, *state.conv, *state.recurrent]


def test_prefill_and_decode_on_meta(tiny_model_dir):
    eng = Engine(tiny_model_dir, dtype="float32", device="meta")
    c = eng.config
    assert all(t.device.type == "meta" for t in (eng.model.embed, eng.model.final_norm))
    logits, state = eng.prefill(list(range(1, 40)), chunk_size=16)
    assert logits.device.type == "meta" and logits.shape == (c.vocab_size,)
    assert all(t.device.type == "meta" for t in _all_tensors(state))
    _, other = eng.prefill([5, 6, 7])
    batch = DecodeBatch(eng, max_batch=4)
    batch.add(state)
    batch.add(other)
    for step in range(3):
        out = batch.step([11, 12])
        assert out.device.type == "meta" and out.shape == (2, c.vocab_size) and out.dtype == torch.float32
    assert state.num_tokens == 39 + 3 and other.num_tokens == 3 + 3
    assert all(t.device.type == "meta" for t in _all_tensors(state))
    assert all(t.device.type == "meta" for t in [*batch.conv, *batch.recurrent])


def test_forward_all_on_meta(tiny_model_dir):
    eng = Engine(tiny_model_dir, dtype="bfloat16", device="meta")
    out = eng.forward_all([1, 2, 3, 4, 5])
    assert out.device.type == "meta" and out.shape == (5, eng.config.vocab_size)


@pytest.mark.parametrize("name", ["tpu", "cuda0", "gpu:1"])
def test_unknown_device_refused(name):
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("spec", ["0", "0-3", "0,2,4-7"])
def test_neuron_cores_accepted(spec, monkeypatch):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    set_neuron_cores(spec)
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == spec


@pytest.mark.parametrize("spec", ["", "a", "3-1", "0-", "1;2"])
def test_neuron_cores_refused(spec):
    with pytest.raises(ValueError):
        parse_cores(spec)


def test_deltanet_kernel_families(tiny_model_dir):
    """The torch ops are the default everywhere; fla is refused without CUDA (and the package)."""
    from qwenpd.engine.engine import Engine, _deltanet_family

    assert _deltanet_family("torch", "cpu") == "torch" and _deltanet_family("nki", "cpu") == "nki"
    with pytest.raises(ValueError, match="flash-linear-attention"):
        Engine(tiny_model_dir, dtype="float32", deltanet_kernels="fla")
    with pytest.raises(ValueError, match="deltanet_kernels"):
        Engine(tiny_model_dir, dtype="float32", deltanet_kernels="auto")
    assert Engine(tiny_model_dir, dtype="float32").kernel_family == "torch"


def test_the_cpu_delta_step_kernel_is_reported_and_hand_offs_still_match(tiny_model_dir, monkeypatch):
    """cpu_step.cpp continues a state; it does not change what a handed-off state means: an engine with it and one
    without (no compiler there, or a CUDA decode) keep one fingerprint, as CPU and CUDA engines do."""
    from qwenpd.kernels.gated_delta_rule import cpu

    ours = Engine(tiny_model_dir, dtype="float32", warm_up=False)
    monkeypatch.setattr(cpu, "load", lambda: False)
    torch_code = Engine(tiny_model_dir, dtype="float32", warm_up=False)
    assert torch_code.delta_step_kernel == "torch"
    assert ours.delta_step_kernel == ("cpp" if cpu.ready else "torch")
    assert ours.fingerprint == torch_code.fingerprint
    meta = Engine(tiny_model_dir, dtype="float32", device="meta", warm_up=False)
    assert meta.delta_step_kernel is None and meta.fingerprint == ours.fingerprint


def test_neuron_cores_split_between_ranks():
    from qwenpd.engine.device import split_cores

    assert split_cores("0-7", 2) == ["0,1,2,3", "4,5,6,7"]
    assert split_cores("4-5,8,9", 4) == ["4", "5", "8", "9"]
    with pytest.raises(ValueError, match="do not split evenly"):
        split_cores("0-2", 2)
