"""A first request pays for nothing a second one would not: the one-time work (packing weights, the import that a
custom op's first call triggers, oneDNN's first kernels) happens while the engine loads (Engine.warm_up)."""

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

engine = Engine(sys.argv[1], dtype="bfloat16", warm_up=sys.argv[2] == "1")
keys = [o.key for o in gc.get_objects() if isinstance(o, linear_mod.Linear)]
print(json.dumps({"linears": len(keys), "packed": sum(k is not None and int(k[0, 0]) in linear_mod._PACKED for k in keys),
                  "free_pages": engine.kv_cache.allocator.free, "usable": engine.kv_cache.allocator.usable,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("bf16") / "m", "tiny", seed=0, dtype="bfloat16")


def _load(model, warm_up: bool) -> dict:
    run = subprocess.run([sys.executable, "-c", CHECK, str(model), "1" if warm_up else "0"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_packed_weights_and_first_call_imports_are_there_before_the_first_request(bf16_model):
    """A fresh process (nothing imported by other tests): once Engine() returns, every projection's packed copies
    exist and the import a custom op's first call makes (torch._dynamo, ~1 s) is done, and the warm-up's scratch
    sequence has given its KV pages back. Without the warm-up, that import would still be owed."""
    got = _load(bf16_model, warm_up=True)
    assert got["linears"] > 0 and got["packed"] == got["linears"]
    assert got["dynamo"]
    assert got["free_pages"] == got["usable"]
    cold = _load(bf16_model, warm_up=False)
    assert cold["packed"] == cold["linears"] and not cold["dynamo"]
