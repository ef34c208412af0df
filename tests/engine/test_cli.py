"""`qwenpd init-model` and in-process `qwenpd generate` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from qwenpd.engine import Engine
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams


def _qwenpd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenpd.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_init_model_then_generate_json(tmp_path):
    out = tmp_path / "m"
    r = _qwenpd("init-model", "--preset", "tiny", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    r = _qwenpd("generate", "--model", str(out), "--prompt-ids", "5,6,7,8", "--max-tokens", "9",
                "--temperature", "0", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["prompt_tokens"] == 4 and len(line["token_ids"]) == 9
    assert line["prefill_s"] > 0 and line["decode_s"] > 0 and line["finish_reason"] == "length"
    from qwenpd.kernels.gated_delta_rule import cpu

    assert line["delta_step_kernel"] == ("cpp" if cpu.load() else "torch")  # which ran the DeltaNet state update
    eng = Engine(out)
    ref = generate(eng, [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert line["token_ids"] == ref.token_ids and line["text"] == ref.text
    stored = sum(t.numel() * t.element_size() for t in load_file(str(out / "model.safetensors")).values())
    assert line["weight_bytes"] == stored - _mtp_bytes(out)  # the text model's weights, as held (fp32 here)
    # the checkpoint's MTP head drafts: the same tokens, and what it drafted and got accepted
    spec = _qwenpd("generate", "--model", str(out), "--prompt-ids", "5,6,7,8", "--max-tokens", "9",
                   "--temperature", "0", "--ignore-eos", "--json", "--num-speculative-tokens", "2")
    got = json.loads(spec.stdout.strip().splitlines()[-1])
    assert got["token_ids"] == line["token_ids"] and got["draft_tokens"] > 0
    assert 0 <= got["accepted_tokens"] == sum(got["accepted_per_position"]) <= got["draft_tokens"]
    assert got["draft_weight_bytes"] == _mtp_bytes(out)  # the head's own weights, as held


def _mtp_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for k, t in load_file(str(model / "model.safetensors")).items()
               if k.startswith("mtp."))


def test_speculative_without_a_head_is_a_usage_error(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("mtp.")}, str(path))
    r = _qwenpd("generate", "--model", str(tmp_path / "m"), "--prompt-ids", "5,6", "--max-tokens", "3",
                "--num-speculative-tokens", "2")
    assert r.returncode == 2 and "mtp." in r.stderr and "Traceback" not in r.stderr
    r = _qwenpd("generate", "--model", str(tiny_model_dir), "--prompt-ids", "5,6", "--max-tokens", "3",
                "--draft-quantize", "int8")  # a head option without a head to run
    assert r.returncode == 2 and "--num-speculative-tokens" in r.stderr and "Traceback" not in r.stderr


def test_generate_text_prompt_with_seed_is_reproducible(tiny_model_dir):
    args = ("generate", "--model", str(tiny_model_dir), "--prompt", "Once upon a time", "--max-tokens", "12",
            "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50", "--seed", "42", "--json")
    a, b = _qwenpd(*args), _qwenpd(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout.splitlines()[-1])["token_ids"] == json.loads(b.stdout.splitlines()[-1])["token_ids"]


def test_generate_reports_bad_input_clearly(tiny_model_dir):
    r = _qwenpd("generate", "--model", str(tiny_model_dir), "--prompt-ids", "1,99999", "--json")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr
    r = _qwenpd("generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--top-p", "0")
    assert r.returncode == 2 and "top_p" in r.stderr
    r = _qwenpd("generate", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:1", "--prompt-ids", "5",
                "--num-speculative-tokens", "2")  # the services were started with their own
    assert r.returncode == 2 and "--num-speculative-tokens" in r.stderr and "Traceback" not in r.stderr


def test_generate_on_explicit_cpu_device_with_neuron_cores(tiny_model_dir):
    """--device cpu gives the default's tokens; --neuron-cores is accepted (it only sets the runtime's env)."""
    base = ("generate", "--model", str(tiny_model_dir), "--prompt-ids", "5,6,7", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos", "--json")
    a = _qwenpd(*base)
    b = _qwenpd(*base, "--device", "cpu", "--neuron-cores", "0-1")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout.splitlines()[-1])["token_ids"] == json.loads(b.stdout.splitlines()[-1])["token_ids"]


def test_generate_refuses_unknown_device(tiny_model_dir):
    r = _qwenpd("generate", "--model", str(tiny_model_dir), "--prompt-ids", "5", "--device", "tpu")
    assert r.returncode == 2 and "device must be one of" in r.stderr and "Traceback" not in r.stderr
    r = _qwenpd("generate", "--model", str(tiny_model_dir), "--prompt-ids", "5", "--neuron-cores", "3-1")
    assert r.returncode == 2 and "runs backwards" in r.stderr


@pytest.mark.skipif(not os.environ.get("QWENPD_SLOW_TESTS"),
                    reason="~50 s of compiling on a 2-core machine (compiled graphs are tested in test_compiled.py and "
                           "by .ci/run's compiled services): set QWENPD_SLOW_TESTS=1")
def test_generate_compiled_reports_warmup_and_gives_the_eager_tokens(tiny_model_dir, tmp_path):
    base = ("generate", "--model", str(tiny_model_dir), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos", "--json", "--chunk-size", "16", "--kv-cache-bytes", "1MiB")
    eager = _qwenpd(*base)
    compiled = [_qwenpd(*base, "--compile", "--compile-cache", str(tmp_path / "cache"), timeout=600) for _ in "ab"]
    assert all(r.returncode == 0 for r in (eager, *compiled)), eager.stderr + compiled[0].stderr
    a, b, again = (json.loads(r.stdout.splitlines()[-1]) for r in (eager, *compiled))
    assert a["warmup_s"] == 0 and b["warmup_s"] > 0
    assert b["token_ids"] == a["token_ids"] == again["token_ids"]
    assert b["prefill_s"] < b["warmup_s"]  # the warm-up is not counted as prefill
    assert again["warmup_s"] < b["warmup_s"] / 2  # the second run reuses the compile cache
    assert "compiled 1/" in compiled[0].stderr  # a line per bucket while it compiles, not minutes of silence
    # without --kv-cache-bytes: a cache of exactly the pages this prompt and --max-tokens need
    sized = _qwenpd(*base[:-2], "--compile", "--compile-cache", str(tmp_path / "cache"), timeout=600)
    assert sized.returncode == 0, sized.stderr
    assert json.loads(sized.stdout.splitlines()[-1])["token_ids"] == a["token_ids"]


def test_check_device_on_cpu_prints_one_table():
    r = _qwenpd("check-device", "--device", "cpu", "--presets", "tiny", "--speed-preset", "tiny", "--no-compile",
                "--prompt-tokens", "100", "--batches", "1,2", "--steps", "2", "--kv-cache-bytes", "8MiB")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:4] == ["check", "model", "dtype", "ok"]
    rows = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert "greedy 16/16 equal" in rows["fp32 vs cpu"]
    assert {"prefill 100 (eager)", "decode b1 (eager)", "decode b2 (eager)"} <= set(rows)
    assert all(" yes " in line for line in lines[2:])


def test_every_flag_of_every_command_says_what_it_does():
    """`--help` of every subcommand documents every flag (a flag without help text is a question for the user)."""
    import argparse

    from qwenpd.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and action.dest != "help" and not (action.help or "").strip():
                missing.append(f"{path} {action.option_strings[0]}")

    walk(build_parser(), "qwenpd")
    assert not missing, missing
    serve = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "gateway" in serve and "all" in serve
