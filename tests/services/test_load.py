"""A short run of bench/load.py: 16 concurrent clients for 15 s against its own `qwenpd serve all` on the tiny
model (mixed prompt lengths, shared prefixes, cancelled streams) — no unexpected failure, nothing leaked, RSS
(without shared memory) within 10% of its post-warm-up level. The 64 x 60 s version is `python bench/load.py`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_load", Path(__file__).resolve().parents[2] / "bench" / "load.py")
load = sys.modules["bench_load"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)


def test_short_load_has_no_unexpected_failures_and_leaks_nothing(tiny_model_dir):
    r = load.run(tiny_model_dir, clients=16, duration=12.0, warmup=4.0)
    load.print_table(r)
    assert r["requests"] > 50 and r["outcomes"].get("ok", 0) > 0
    assert r["unexpected"] == {}
    assert r["outcomes"].get("cancelled", 0) > 0  # the mix did cancel some streams mid-way
    assert (r["leases_left"], r["allocations_left"]) == (0, 0)
    assert r["segments_known"] == r["segments_on_disk"] and r["segments_after_stop"] == 0
    assert r["exit_code"] == 0
    assert all(g <= 0.10 for g in r["rss_private_growth"].values()), r["rss_private_growth"]
