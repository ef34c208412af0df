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
    assert cfg.device == "cpu" and cfg.neuron_cores is None
    cfg = module.config_from_args(p.parse_args([*base, "--device", "neuron", "--neuron-cores", "4-7"]))
    assert cfg.device == "neuron" and cfg.neuron_cores == "4-7"
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
    assert (s.prefill_config.device, s.prefill_config.neuron_cores) == ("neuron", "0-3")
    assert (s.decode_config.device, s.decode_config.neuron_cores) == ("cuda:1", None)
    assert s.prefill_config.kv_cache_bytes == s.decode_config.kv_cache_bytes == 1 << 30
    assert s.prefill_config.compile and s.decode_config.compile
    assert s.prefill_config.whole_graphs and s.decode_config.whole_graphs
    assert s.gateway_config.resume_wait_s == 90


@pytest.mark.parametrize("module", [prefill_config, decode_config], ids=["prefill", "decode"])
def test_compile_flags_need_a_fixed_kv_cache(module, tiny_model_dir, tmp_path):
    p = argparse.ArgumentParser()
    module.add_args(p)
    base = ["--model", str(tiny_model_dir), "--cache", "127.0.0.1:1", "--compile"]
    with pytest.raises(ValueError, match="--kv-cache-bytes"):
        module.config_from_args(p.parse_args(base))
    cfg = module.config_from_args(p.parse_args([*base, "--kv-cache-bytes", "64MiB", "--compile-cache",
                                                str(tmp_path)]))
    assert cfg.compile and cfg.kv_cache_bytes == 64 << 20 and cfg.compile_cache == str(tmp_path)
    assert not cfg.whole_graphs and module.config_from_args(
        p.parse_args([*base, "--kv-cache-bytes", "64MiB", "--whole-graphs"])).whole_graphs
