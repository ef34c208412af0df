"""What constrained decoding costs a decode step: a batch of 8 with 0, 1 and 8 sequences under a grammar.

    python bench/constrained.py [--preset small] [--dtype bfloat16] [--steps 40] [--spec json|tools]

One engine, one DecodeBatch of 8 (prompts of 128 tokens); each step is what the decode service's stepping thread
does: the batched forward, then each row's sampler (temperature 1, seeded; a constrained row masks the logits with
llguidance's token mask first). Constrained rows run twice: with the mask computed when the row samples, and
prefetched (the default: started on a worker thread as soon as the previous token is sampled, so it runs during
the next forward pass). Median step time over --steps steps per configuration, runs interleaved, and the ratio
against 0 constrained measured in the same run. Also the mask alone (fill + apply) per constrained row. The mask's cost grows with the tokenizer's vocabulary: the embedded tokenizer has a few
hundred tokens, Qwen3.6's 248,320. No real tokenizer can be downloaded here, so `--qwen-vocab` gives the model
Qwen3.6's vocabulary (248,320 embedding rows) and its tokenizer ~248,000 tokens: the embedded tokenizer's plus
deterministic pseudo-words in the byte-level alphabet (lengths and shapes like a BPE vocabulary's, not its
words), which is what llguidance's token trie, and so the mask's cost, depends on.
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
from qwenpd.engine import DecodeBatch, Engine, constraint  # noqa: E402
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


def qwen_vocab_checkpoint(out: Path, preset: str, dtype: str) -> Path:
    """`preset` with Qwen3.6's 248,320-row vocabulary and a tokenizer of ~248,000 tokens (module doc)."""
    import random

    from qwenpd.engine.config import preset as preset_config

    config = preset_config(preset).replace(vocab_size=248_320)
    model = init_model(out, config, seed=0, dtype=dtype)
    spec = json.loads((model / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < 248_000:
        n = min(12, max(1, int(rng.expovariate(1 / 5))))
        word = "".join(rng.choice(letters) for _ in range(n))
        word = ("Ġ" + word if rng.random() < 0.6 else word.capitalize() if rng.random() < 0.2 else word)
        if word not in vocab:
            vocab[word] = len(vocab)  # the special tokens are in vocab too, first
    (model / "tokenizer.json").write_text(json.dumps(spec))
    return model


def measure(engine: Engine, constrained: int, spec: str, steps: int, prefetch: bool) -> tuple[float, float]:
    """(median seconds per step, median seconds of the mask alone per constrained row)."""
    constraint.PREFETCH = engine.grammars.prefetch = prefetch
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
            tokens[row], _ = sampler.sample(logits[row])
        times.append(time.perf_counter() - t0)
        if constrained and not prefetch:  # the mask alone, on the state the next step will see
            c = samplers[0].constraint
            m0 = time.perf_counter()
            c.allowed(logits[0].float())
            masks.append(time.perf_counter() - m0)
    for s in list(batch.states):
        batch.remove(s)
        s.release()
    constraint.PREFETCH = True
    return statistics.median(times), statistics.median(masks) if masks else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--spec", choices=("json", "tools"), default="json")
    p.add_argument("--qwen-vocab", action="store_true", help="Qwen3.6's vocabulary size, synthetic tokenizer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = (qwen_vocab_checkpoint(Path(tmp) / "model", args.preset, args.dtype) if args.qwen_vocab
                 else init_model(Path(tmp) / "model", args.preset, seed=0))
        engine = Engine(model, dtype=args.dtype)
        spec = spec_of(args.spec)
        words = engine.grammars.words
        results: dict[tuple[int, bool], list[tuple[float, float]]] = {
            (0, False): [], (1, False): [], (1, True): [], (8, False): [], (8, True): []}
        for _ in range(args.rounds):  # interleaved rounds: drift hits every configuration alike
            for n, prefetch in results:
                results[(n, prefetch)].append(measure(engine, n, spec, args.steps, prefetch))
    print(f"# {cpu_description()}; {args.preset} {args.dtype}, {torch.get_num_threads()} threads; "
          f"tokenizer of {words} tokens, model vocabulary {engine.config.vocab_size}; grammar: {args.spec}")
    print("\n| constrained in a batch of 8 | mask | decode step (median) | vs 0 constrained | mask alone per row |")
    print("|---|---|---|---|---|")
    base = statistics.median(t for t, _ in results[(0, False)])
    for (n, prefetch), runs in results.items():
        step = statistics.median(t for t, _ in runs)
        mask = statistics.median(m for _, m in runs)
        how = "-" if not n else "prefetched" if prefetch else "at sampling"
        print(f"| {n} | {how} | {1e3 * step:.2f} ms | {step / base:.3f} | "
              f"{f'{1e3 * mask:.3f} ms' if n and not prefetch else '-'} |")


if __name__ == "__main__":
    main()
