"""What constrained decoding costs a decode step: a batch of 8 with 0, 1 and 8 sequences under a grammar.

    python bench/constrained.py [--preset small] [--dtype bfloat16] [--steps 40] [--spec json|tools]

One engine, one DecodeBatch of 8 (prompts of 128 tokens); each step is what the decode service's stepping thread
does: the batched forward, then each row's sampler (temperature 1, seeded; a constrained row builds its token mask
with llguidance and masks the logits first). Median step time over --steps steps per configuration, runs
interleaved, and the ratio against 0 constrained measured in the same run. Also the mask alone (fill + apply)
per constrained row. The mask's cost grows with the tokenizer's vocabulary: the embedded tokenizer has a few
hundred tokens, Qwen3.6's 248,320, so this shows the per-row overhead of our integration, not the cost with
Qwen3.6's tokenizer (no real tokenizer can be downloaded here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.clients.chat_output import tool_call_grammar  # noqa: E402
from qwenpd.engine import DecodeBatch, Engine  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402
from qwenpd.engine.sampling import Sampler, SamplingParams  # noqa: E402

from machine import cpu_description  # noqa: E402 - bench/machine.py

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}]


def spec_of(name: str) -> str:
    if name == "tools":
        return json.dumps({"type": "lark", "grammar": tool_call_grammar(TOOLS)})
    return json.dumps({"type": "json_schema", "schema": {"type": "object", "properties": {
        "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}})


def measure(engine: Engine, constrained: int, spec: str, steps: int) -> tuple[float, float]:
    """(median seconds per step, median seconds of the mask alone per constrained row)."""
    batch = DecodeBatch(engine, 8)
    states = [engine.prefill([1 + (i * 7 + j) % 400 for j in range(128)])[1] for i in range(8)]
    for s in states:
        batch.add(s)
    samplers = [Sampler.resumed(SamplingParams(temperature=1.0, seed=i, max_tokens=10 ** 6,
                                               structured_output=spec if i < constrained else ""),
                                0, engine.eos_token_ids, (), engine.grammars) for i in range(8)]
    tokens = [5] * 8
    times, masks = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = batch.step(tokens)
        for row, sampler in enumerate(samplers):
            if sampler.constraint is not None:
                m0 = time.perf_counter()
                sampler.constraint.allowed(logits[row].float())
                masks.append(time.perf_counter() - m0)
            tokens[row], _ = sampler.sample(logits[row])
        times.append(time.perf_counter() - t0 - sum(masks[-constrained:]) if constrained else
                     time.perf_counter() - t0)
    for s in list(batch.states):
        batch.remove(s)
        s.release()
    return statistics.median(times), statistics.median(masks) if masks else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--spec", choices=("json", "tools"), default="json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(init_model(Path(tmp) / "model", args.preset, seed=0), dtype=args.dtype)
        spec = spec_of(args.spec)
        words = engine.grammars.words
        results: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 8: []}
        for _ in range(args.rounds):  # interleaved rounds: drift hits every configuration alike
            for n in results:
                results[n].append(measure(engine, n, spec, args.steps))
    print(f"# {cpu_description()}; {args.preset} {args.dtype}, {torch.get_num_threads()} threads; "
          f"tokenizer of {words} tokens, model vocabulary {engine.config.vocab_size}; grammar: {args.spec}")
    print("\n| constrained in a batch of 8 | decode step (median) | vs 0 constrained | mask per constrained row |")
    print("|---|---|---|---|")
    base = statistics.median(t for t, _ in results[0])
    for n, runs in results.items():
        step = statistics.median(t for t, _ in runs)
        mask = statistics.median(m for _, m in runs)
        print(f"| {n} | {1e3 * step:.2f} ms | {step / base:.3f} | {1e3 * mask:.3f} ms |")


if __name__ == "__main__":
    main()
