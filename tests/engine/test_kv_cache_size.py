"""--kv-cache-bytes as bytes or as a fraction of the device memory free once the weights are loaded: parsing,
the size it resolves to on CPU, and bad values refused before anything loads (exit code 2)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from qwenpd.engine import Engine
from qwenpd.engine import kv_cache as kv_cache_mod
from qwenpd.engine.device import _mem_available, free_memory
from qwenpd.engine.engine import EngineConfig
from qwenpd.engine.kv_cache import page_bytes
from qwenpd.serve import add_serve_all_args
from qwenpd.units import parse_kv_cache_size
from qwenpd.supervisor import ServiceSet, config_from_json, config_to_json


@pytest.mark.parametrize("text,value", [("0.9", 0.9), ("90%", 0.9), ("100%", 1.0), (".5", 0.5), ("1.0", 1.0),
                                        ("1GiB", 1 << 30), ("1048576", 1 << 20), ("1", 1), ("0.5GiB", 1 << 29)])
def test_a_kv_cache_size_is_bytes_or_a_fraction(text, value):
    got = parse_kv_cache_size(text)
    assert got == value and type(got) is type(value)  # int = bytes, float = fraction


@pytest.mark.parametrize("text", ["0", "0%", "0.0", "150%", "1.5", "-1", "lots", "", "90 %%"])
def test_bad_kv_cache_sizes_are_argparse_errors(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_kv_cache_size(text)


@pytest.mark.parametrize("size", [0, -5, 0.0, 1.5, True, "1GiB"])
def test_engine_config_refuses_bad_sizes(tiny_model_dir, size):
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        EngineConfig(str(tiny_model_dir), kv_cache_bytes=size)


def test_mem_available_is_read_from_proc_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nMemFree:        20000000 kB\nMemAvailable:   123456 kB\n")
    assert _mem_available(str(meminfo)) == 123456 * 1024
    with pytest.raises(ValueError, match="MemAvailable"):
        _mem_available(str(tmp_path / "missing"))
    assert free_memory(torch.device("cpu")) > 0


def test_a_fraction_sizes_the_cache_from_free_memory_after_the_weights(tiny_model_dir, monkeypatch):
    config = Engine(tiny_model_dir).config
    asked = []

    def free(device):  # the weights are on the device by the time the engine asks
        asked.append(device)
        return 64 * page_bytes(config, 8, torch.float32)

    monkeypatch.setattr(kv_cache_mod, "free_memory", free)
    eng = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=0.5, page_size=8)
    assert asked == [torch.device("cpu")]
    assert eng.kv_cache.num_pages == 32 and not eng.kv_cache.growable
    eng = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=20 * page_bytes(config, 8, torch.float32),
                 page_size=8)  # bytes: free memory is not asked
    assert eng.kv_cache.num_pages == 20 and len(asked) == 1


def test_a_fraction_of_this_cpus_free_memory(tiny_model_dir):
    fraction = 1e-4
    eng = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=fraction)
    expected = fraction * free_memory(torch.device("cpu"))
    assert not eng.kv_cache.growable
    assert 0.8 * expected <= eng.kv_cache.num_bytes <= 1.2 * expected  # MemAvailable moves a little meanwhile


def test_meta_has_no_free_memory_to_take_a_fraction_of(tiny_model_dir):
    with pytest.raises(ValueError, match="give --kv-cache-bytes as a size"):
        Engine(tiny_model_dir, device="meta", kv_cache_bytes=0.5)
    assert Engine(tiny_model_dir, device="meta", kv_cache_bytes=1 << 20).kv_cache.num_bytes <= 1 << 20


def test_serve_all_hands_both_services_the_fraction(tiny_model_dir):
    p = argparse.ArgumentParser()
    add_serve_all_args(p)
    args = p.parse_args(["--model", str(tiny_model_dir), "--kv-cache-bytes", "45%", "--compile"])
    args.log_level = "INFO"
    s = ServiceSet.from_args(args)
    for cfg in (s.prefill_config, s.decode_config):
        again = config_from_json(config_to_json(cfg))  # how the supervisor hands a child its config
        assert again.engine.kv_cache_bytes == cfg.engine.kv_cache_bytes == 0.45 and \
            isinstance(again.engine.kv_cache_bytes, float)


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt-ids", "5", "--kv-cache-bytes", "150%"],
    ["serve", "prefill", "--cache", "127.0.0.1:1", "--kv-cache-bytes", "0"],
    ["serve", "decode", "--cache", "127.0.0.1:1", "--kv-cache-bytes", "1.5"],
    ["serve", "all", "--kv-cache-bytes", "lots"],
], ids=["generate", "prefill", "decode", "all"])
def test_bad_sizes_exit_2_before_loading(tiny_model_dir, argv):
    r = subprocess.run([sys.executable, "-m", "qwenpd.cli", *argv, "--model", str(tiny_model_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-cache-bytes" in r.stderr and "Traceback" not in r.stderr, r.stderr
