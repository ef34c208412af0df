"""A first request pays for nothing a second one would not: the one-time work (packing weights, oneDNN's first
kernels) happens while the engine loads (Engine.warm_up), and an eager engine never imports torch._dynamo (a
custom op's first eager call would: kernels/ops.py calls their code directly)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwenpd.engine.init_model import init_model

CHECK = """
import gc, json, sys
from qwenpd.engine import linear as linear_mod
from qwenpd.engine.engine import Engine

from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams

engine = Engine(sys.argv[1], dtype="bfloat16", warm_up=sys.argv[2] == "1")
keys = [o.key for o in gc.get_objects() if isinstance(o, linear_mod.Linear)]
loaded = {"linears": len(keys), "packed": sum(k is not None and int(k[0, 0]) in linear_mod._PACKED for k in keys),
          "free_pages": engine.kv_cache.allocator.free, "usable": engine.kv_cache.allocator.usable,
          "dynamo": "torch._dynamo" in sys.modules}
generate(engine, list(range(3, 300)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
print(json.dumps({**loaded, "dynamo_after_a_request": "torch._dynamo" in sys.modules}))
"""


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("bf16") / "m", "tiny", seed=0, dtype="bfloat16")


def _load(model, warm_up: bool) -> dict:
    run = subprocess.run([sys.executable, "-c", CHECK, str(model), "1" if warm_up else "0"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_packed_weights_before_the_first_request_and_no_dynamo_ever(bf16_model):
    """A fresh process (nothing imported by other tests): once Engine() returns, every projection's packed copies
    exist and the warm-up's scratch sequence has given its KV pages back; neither loading nor a request (prefill and
    decode) imports torch._dynamo (1-2 s of CPU, which every eager prefill and decode process paid at start)."""
    got = _load(bf16_model, warm_up=True)
    assert got["linears"] > 0 and got["packed"] == got["linears"]
    assert got["free_pages"] == got["usable"]
    assert not got["dynamo"] and not got["dynamo_after_a_request"]
    cold = _load(bf16_model, warm_up=False)
    assert cold["packed"] == cold["linears"] and not cold["dynamo_after_a_request"]
