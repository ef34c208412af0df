"""--device / --neuron-cores of the prefill and decode services and `serve all` (flags -> configs -> child argv)."""

from __future__ import annotations

import argparse

import pytest

from qwenpd.serve import add_serve_all_args
from qwenpd.supervisor import ServiceSet
from qwenpd.decode_service import config as decode_config
from qwenpd.prefill_service import config as prefill_config


@pytest.mark.parametrize("module", [prefill_config, decode_config], ids=["prefill", "decode"])
def test_device_flags_reach_the_config(module, tiny_model_dir):
    p = argparse.ArgumentParser()
    module.add_args(p)
    base = ["--model", str(tiny_model_dir), "--cache", "127.0.0.1:1"]
    cfg = module.config_from_args(p.parse_args(base))
    assert cfg.engine.device == "cpu" and cfg.engine.neuron_cores is None
    cfg = module.config_from_args(p.parse_args([*base, "--device", "neuron", "--neuron-cores", "4-7"]))
    assert cfg.engine.device == "neuron" and cfg.engine.neuron_cores == "4-7"
    with pytest.raises(ValueError, match="device must be one of"):
        module.config_from_args(p.parse_args([*base, "--device", "tpu"]))
    with pytest.raises(ValueError, match="neuron cores"):
        module.config_from_args(p.parse_args([*base, "--neuron-cores", "x"]))


def test_serve_all_passes_each_role_its_device_and_cores(tiny_model_dir):
    p = argparse.ArgumentParser()
    add_serve_all_args(p)
    args = p.parse_args(["--model", str(tiny_model_dir), "--prefill-device", "neuron", "--prefill-cores", "0-3",
                         "--decode-device", "cuda:1", "--kv-cache-bytes", "1GiB", "--compile", "--whole-graphs",
                         "--resume-wait", "90"])
    args.log_level = "INFO"  # a flag of every serve command, added beside these
    s = ServiceSet.from_args(args)
    prefill, decode = s.prefill_config.engine, s.decode_config.engine
    assert (prefill.device, prefill.neuron_cores) == ("neuron", "0-3")
    assert (decode.device, decode.neuron_cores) == ("cuda:1", None)
    assert prefill.kv_cache_bytes == decode.kv_cache_bytes == 1 << 30
    assert prefill.compile and decode.compile
    assert prefill.whole_graphs and decode.whole_graphs
    assert s.gateway_config.resume_wait_s == 90


@pytest.mark.parametrize("module", [prefill_config, decode_config], ids=["prefill", "decode"])
def test_compile_flags_get_a_fixed_kv_cache(module, tiny_model_dir, tmp_path):
    p = argparse.ArgumentParser()
    module.add_args(p)
    base = ["--model", str(tiny_model_dir), "--cache", "127.0.0.1:1", "--compile"]
    assert module.config_from_args(p.parse_args(base)).engine.kv_cache_bytes == 2 << 30  # the CPU default
    cfg = module.config_from_args(p.parse_args([*base, "--kv-cache-bytes", "64MiB", "--compile-cache",
                                                str(tmp_path)]))
    ec = cfg.engine
    assert ec.compile and ec.kv_cache_bytes == 64 << 20 and ec.compile_cache == str(tmp_path)
    assert not ec.whole_graphs and module.config_from_args(
        p.parse_args([*base, "--kv-cache-bytes", "64MiB", "--whole-graphs"])).engine.whole_graphs


def test_serve_all_passes_the_gateway_its_names_and_origins(tiny_model_dir):
    p = argparse.ArgumentParser()
    add_serve_all_args(p)
    args = p.parse_args(["--model", str(tiny_model_dir), "--served-model-name", "a", "b/c",
                         "--cors-origin", "https://x.example"])
    args.log_level = "INFO"
    s = ServiceSet.from_args(args)
    assert s.gateway_config.served_model_names == ("a", "b/c")
    assert s.gateway_config.cors_origins == ("https://x.example",)
    args = p.parse_args(["--model", str(tiny_model_dir)])
    args.log_level = "INFO"
    plain = ServiceSet.from_args(args)
    assert plain.gateway_config.served_model_names == () and plain.gateway_config.cors_origins == ()


def test_serve_all_resume_wait_follows_the_mode(tiny_model_dir):
    """A compiled decode restarts in its warm-up from the compile cache: the gateway waits long enough for that by
    default; an eager one restarts in seconds."""
    p = argparse.ArgumentParser()
    add_serve_all_args(p)
    waits = []
    for extra in ([], ["--compile"], ["--compile", "--resume-wait", "30"]):
        args = p.parse_args(["--model", str(tiny_model_dir), *extra])
        args.log_level = "INFO"
        waits.append(ServiceSet.from_args(args).gateway_config.resume_wait_s)
    assert waits == [15.0, 120.0, 30.0]
