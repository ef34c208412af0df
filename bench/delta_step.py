"""The CPU kernel of a decode step's DeltaNet state update (kernels/gated_delta_rule/cpu_step.cpp) against the
torch code it replaces (step_state_torch), in one process, runs alternating.

    python bench/delta_step.py [--preset small] [--dtype bfloat16] [--batches 1,8,32] [--rounds 10] [--no-compile]

First the state update alone, at the preset's and at Qwen3.6-27B's DeltaNet shapes (one layer's state per sequence:
Hv x K x V fp32). Then whole decode steps of the preset's engine, eager and compiled (regions, as the decode
service compiles them), each batch size stepping with the kernel and with the torch code in turn (blocks of
`--steps` steps, `--rounds` blocks each, the order swapped every round): ms per step (median of the blocks) and
the ratio torch / kernel, i.e. the speed-up. Switching inside one process is this script's doing (the engine
loads the kernel once and keeps it); a compiled region traces it both ways (two graphs per region).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_description  # noqa: E402 - bench/machine.py

from qwenpd.engine import DecodeBatch, Engine  # noqa: E402
from qwenpd.engine.config import PRESETS  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402
from qwenpd.engine.pages import pages_for  # noqa: E402
from qwenpd.engine.runner import Buckets  # noqa: E402
from qwenpd.kernels.gated_delta_rule import cpu, step_inputs, step_state_torch  # noqa: E402

LOAD = cpu.load
PROMPT = 256  # tokens before the timed steps


def use_kernel(on: bool) -> None:
    """What step_state reads: the kernel (as loaded) or, switched off, the torch code."""
    cpu.ready = on
    cpu.load = LOAD if on else (lambda: False)


def alternating(run, rounds: int) -> tuple[float, float]:
    """Median seconds of run() with the torch code and with the kernel, blocks alternating (order swapped)."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            use_kernel(on)
            t = time.perf_counter()
            run()
            times[on].append(time.perf_counter() - t)
    use_kernel(True)
    return statistics.median(times[False]), statistics.median(times[True])


def kernel_alone(name: str, hk: int, hv: int, dk: int, dv: int, layers: int, batches: list[int], rounds: int):
    g = torch.Generator().manual_seed(0)
    for b in batches:
        q, k = (torch.randn(b, hk, dk, generator=g).bfloat16() for _ in range(2))
        v = torch.randn(b, hv, dv, generator=g).bfloat16()
        x = step_inputs(q, k, v, -torch.rand(b, hv, generator=g), torch.rand(b, hv, generator=g).bfloat16())
        states = [torch.randn(b, hv, dk, dv, generator=g) * 0.1 for _ in range(layers)]

        def run():
            for s in states:
                if cpu.ready:
                    torch.ops.qwenpd_delta.step_state(x.qk, x.qdotk, x.decay, x.beta, x.v, s)
                else:
                    step_state_torch(x, s)

        old, new = alternating(run, rounds)
        mb = b * hv * dk * dv * 4 * layers / 1e6
        print(f"| {name}: {layers} layers' state update alone | {b} | {mb:.0f} MB | {old * 1e3:.2f} | "
              f"{new * 1e3:.2f} | {old / new:.2f}x |")


def engine_steps(eng: Engine, label: str, batches: list[int], steps: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    for b in batches:
        batch = DecodeBatch(eng, b)
        for _ in range(b):
            _, state = eng.prefill(torch.randint(3, 500, (PROMPT,), generator=g).tolist())
            batch.add(state)
        tokens = [5] * b
        for on in (False, True):  # warm (a compiled region traces each way once)
            use_kernel(on)
            for _ in range(3):
                batch.step(tokens)

        def run():
            for _ in range(steps):
                batch.step(tokens)

        old, new = alternating(run, rounds)
        print(f"| {label} decode step | {b} | - | {old / steps * 1e3:.2f} | {new / steps * 1e3:.2f} | "
              f"{old / new:.2f}x |")
        for state in list(batch.states):
            batch.remove(state)
            state.release()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--steps", type=int, default=8, help="decode steps per block")
    p.add_argument("--rounds", type=int, default=10, help="blocks per side")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    if not cpu.load():
        sys.exit(f"no delta-rule step kernel here: {cpu.why_not}")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {cpu_description()}; {torch.get_num_threads()} threads; {args.preset} {args.dtype}")
    print("\n| what | batch | state | torch code (ms) | kernel (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys((args.preset, "qwen3.6-27b")):
        c = PRESETS[name]
        kernel_alone(name, c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                     c.linear_value_head_dim, len(c.linear_layers) if name == args.preset else 1, batches,
                     args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / args.preset
        init_model(model, args.preset, seed=0, dtype=args.dtype)
        engine_steps(Engine(model, dtype=args.dtype), "eager", batches, args.steps, args.rounds)
        if not args.no_compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            eng = Engine(model, dtype=args.dtype, kv_cache_bytes=1 << 30)
            longest = PROMPT + 6 + 2 * args.rounds * args.steps  # warm-up and timed steps
            widths = (pages_for(longest, eng.kv_cache.page_size),)
            seconds = eng.compile(Buckets((PROMPT,), tuple(batches), widths), max_batch=max(batches))
            print(f"<!-- compiled in {seconds:.0f} s -->")
            engine_steps(eng, "compiled", batches, args.steps, args.rounds)


if __name__ == "__main__":
    main()
