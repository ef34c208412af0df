"""--device / --neuron-cores of the prefill and decode services and `serve all` (flags -> configs -> child argv)."""

from __future__ import annotations

import argparse

import pytest

from qwenpd.clients.cli import add_serve_all_args
from qwenpd.clients.supervisor import ServiceSet
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


def test_serve_all_passes_each_role_its_device_and_cores():
    p = argparse.ArgumentParser()
    add_serve_all_args(p)
    args = p.parse_args(["--model", "m", "--prefill-device", "neuron", "--prefill-cores", "0-3",
                         "--decode-device", "cuda:1"])
    args.log_level = "INFO"  # a flag of every serve command, added beside these
    s = ServiceSet.from_args(args)
    assert s._device_flags(s.prefill_device, s.prefill_cores) == ["--device", "neuron", "--neuron-cores", "0-3"]
    assert s._device_flags(s.decode_device, s.decode_cores) == ["--device", "cuda:1"]


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
