"""`--deltanet-kernels nki`: the engine's prefill and decode call the NKI kernels (the CPU emulator here, the
official simulator or nki.jit where the Neuron SDK exists) and produce the same greedy tokens as torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwenpd.engine import Engine
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("which", ["tiny", "hf-every2nd"])
def test_nki_kernels_give_same_greedy_tokens(which, tiny_model_dir, hf_checkpoint):
    path = tiny_model_dir if which == "tiny" else hf_checkpoint("every2nd")
    torch_eng = Engine(path, dtype="float32")
    nki_eng = Engine(path, dtype="float32", deltanet_kernels="nki")
    assert nki_eng.model.kernels.name == "nki"
    prompt = torch.randint(0, torch_eng.config.vocab_size, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = generate(torch_eng, prompt, GREEDY, chunk_size=64)
    got = generate(nki_eng, prompt, GREEDY, chunk_size=64)
    assert got.token_ids == ref.token_ids
    # and the logits agree closely, not just the argmax
    a, _ = torch_eng.prefill(prompt, chunk_size=64)
    b, _ = nki_eng.prefill(prompt, chunk_size=64)
    assert (a - b).abs().max().item() <= 1e-4


def test_cli_switch(tiny_model_dir):
    outs = []
    for kernels in ("torch", "nki"):
        r = subprocess.run([sys.executable, "-m", "qwenpd.cli", "generate", "--model", str(tiny_model_dir),
                            "--prompt", "The quick brown fox", "--max-tokens", "8", "--temperature", "0",
                            "--deltanet-kernels", kernels, "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.splitlines()[-1])["token_ids"])
    assert outs[0] == outs[1]
