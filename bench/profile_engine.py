"""Where the time of the engine goes: decode batch 1, decode batch 32 and prefill 2048 of a preset, by op class.

    python bench/profile_engine.py --preset small --dtype bfloat16 [--compile] [--threads 2]

Each measure runs under torch.profiler; every top-level op (one the Python code called, not one inside another
op) is put in a class by name, and what is left of the wall time is framework overhead (Python, dispatch, guards,
allocation between ops). Prints one markdown table per engine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qwenpd.engine import DecodeBatch, Engine
from qwenpd.engine.pages import pages_for
from qwenpd.engine.init_model import init_model
from qwenpd.engine.runner import Buckets

CLASSES = (  # first match wins: (class, substrings of the op name)
    ("delta rule", ("gated_delta_rule",)),
    ("conv", ("causal_conv1d",)),
    ("attention", ("paged_attention", "write_kv")),
    ("matmuls", ("linear", "addmm", "aten::mm", "aten::bmm", "matmul", "mkldnn")),
    ("embedding / lm_head gather", ("index_select", "aten::embedding", "aten::index")),
    ("compiled elementwise (fused)", ("cpp_fused", "kernel_cpp")),
)


def op_class(name: str) -> str:
    for cls, keys in CLASSES:
        if any(k in name for k in keys):
            return cls
    return "norms / elementwise / copies"


def _top_level(events):
    """Events with no op parent: what Python (or a compiled graph's wrapper) called directly."""
    out = []
    for e in events:
        p = e.cpu_parent
        while p is not None and p.name.startswith(("Torch-Compiled Region", "CompiledFunction", "## ")):
            p = p.cpu_parent  # ops a compiled graph calls count as top level
        if p is None and not e.name.startswith(("Torch-Compiled Region", "CompiledFunction", "## ")):
            out.append(e)
    return out


def profile_run(fn) -> tuple[float, float, dict[str, float]]:
    """(wall s without the profiler, wall s under it, seconds per op class under it) of one call of fn."""
    fn()  # warm
    t0 = time.perf_counter()
    fn()
    plain = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    by_class: dict[str, float] = defaultdict(float)
    for e in _top_level(prof.events()):
        by_class[op_class(e.name)] += e.cpu_time_total / 1e6
    return plain, wall, by_class


def measures(eng: Engine, vocab: int, prompt: int, steps: int):
    g = torch.Generator().manual_seed(0)

    def decode_fn(bsz):
        batch = DecodeBatch(eng, bsz)
        for _ in range(bsz):
            _, st = eng.prefill(torch.randint(10, vocab, (prompt,), generator=g).tolist(), chunk_size=2048)
            batch.add(st)
        ids = [11] * bsz

        def run():
            for _ in range(steps):
                batch.step(ids)
        return run

    ids2048 = torch.randint(10, vocab, (2048,), generator=g).tolist()
    yield "decode b1 (per step)", decode_fn(1), steps
    yield "decode b32 (per step)", decode_fn(32), steps
    yield "prefill 2048 (per prompt)", lambda: eng.prefill(ids2048, chunk_size=2048), 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--model", help="existing checkpoint dir (default: init the preset into a temp dir)")
    ap.add_argument("--compile", action="store_true", help="profile the compiled engine instead of the eager one")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per measure")
    ap.add_argument("--prompt", type=int, default=128, help="decode prompt length")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else init_model(Path(tmp) / "m", args.preset, dtype=args.dtype)
        eng = Engine(model_dir, dtype=args.dtype, kv_cache_bytes=(1 << 30) if args.compile else None)
        if args.compile:
            page = eng.kv_cache.page_size
            widths = tuple(sorted({pages_for(args.prompt + 2 * args.steps + 4, page), pages_for(2048, page)}))
            warm = eng.compile(Buckets((2048,), (1, 32), widths), max_batch=32)
            print(f"compiled in {warm:.0f} s")
        rows = []
        for label, fn, steps in measures(eng, eng.config.vocab_size, args.prompt, args.steps):
            plain, wall, by_class = profile_run(fn)
            rows.append((label, wall / steps, {k: v / steps for k, v in by_class.items()}, plain / steps))
    classes = [c for c, _ in CLASSES] + ["norms / elementwise / copies"]
    print(f"\n{args.preset}, {args.dtype}, {torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}")
    print("| op class | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for cls in classes:
        if any(r[2].get(cls, 0) for r in rows):
            print(f"| {cls} | " + " | ".join(f"{r[2].get(cls, 0) * 1e3:.2f} ms ({r[2].get(cls, 0) / r[1]:.0%})"
                                               for r in rows) + " |")
    print("| framework overhead (wall - ops) | " + " | ".join(
        f"{(r[1] - sum(r[2].values())) * 1e3:.2f} ms ({(r[1] - sum(r[2].values())) / r[1]:.0%})" for r in rows) + " |")
    print("| **wall, profiled** | " + " | ".join(f"**{r[1] * 1e3:.2f} ms**" for r in rows) + " |")
    print("| wall, not profiled | " + " | ".join(f"{r[3] * 1e3:.2f} ms" for r in rows) + " |")


if __name__ == "__main__":
    main()
