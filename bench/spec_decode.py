"""Speculative decoding with the MTP head against plain decoding, in one run, on the distilled `small` checkpoint.

    python bench/spec_decode.py [--preset small] [--dtype bfloat16] [--k 3] [--prompt 512] [--tokens 128] [--runs 3]

The checkpoint is init-model's `preset` with its MTP head distilled by bench/distill_mtp.py (cached; made on first
use, ~10 min for small on 2 cores). Prompts are 512 tokens of the kind the head was distilled on: 32 random
tokens continued greedily by the model itself. For each prompt: plain `generate` (batch 1, eager) and
`generate_speculative` with K = 1..4 and both rollbacks, runs interleaved; every speculative run is checked to give
plain decoding's tokens. Table: decode tokens/s (median over runs and prompts), the ratio to plain decoding
measured in the same run, the mean accepted length (tokens emitted per verify pass: accepted drafts + 1), the
acceptance per draft position, and the bytes a verify pass keeps for undoing rejected drafts.

A head distilled on a random-weight model drafts poorly (its held-out agreement with the model is a few percent:
there is little for a one-layer head to learn about a random model's next-but-one token), so the table also has
rows with *oracle* drafts at a set acceptance (`--oracle`): the head runs as usual (its cost is paid) and each of
its drafts is then replaced by the token plain decoding chooses there with that probability (seeded), else by a
wrong one. They measure what the machinery costs and gains at a given acceptance, not a head's quality.

Only batch 1 in-process eager is built: speculation in the decode service's continuous batching (b8, b32) and in
compiled graphs is not, so those columns are not measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_mtp import cached  # noqa: E402 - bench/distill_mtp.py
from machine import cpu_description  # noqa: E402 - bench/machine.py

from qwenpd.engine import Engine  # noqa: E402
from qwenpd.engine.generate import generate, generate_speculative  # noqa: E402
from qwenpd.engine.mtp import load_head  # noqa: E402
from qwenpd.engine.sampling import SamplingParams  # noqa: E402
from qwenpd.engine.speculative import Drafter  # noqa: E402


def prompts(engine: Engine, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    vocab = engine.grammars.words if engine.grammars else engine.config.vocab_size
    out = []
    for _ in range(n):
        start = torch.randint(3, vocab, (32,), generator=g).tolist()
        cont = generate(engine, start, SamplingParams(temperature=0, max_tokens=length - 32, ignore_eos=True))
        out.append(start + cont.token_ids)
    return out


def oracle(sequence: list[int], acceptance: float, seed: int):
    """Drafter.draft that runs the head, then puts plain decoding's token at each draft position with probability
    `acceptance` (a wrong token otherwise)."""
    real = Drafter.draft
    rng = torch.Generator().manual_seed(seed)

    def draft(self, hidden, next_tokens, start, k):
        out = real(self, hidden, next_tokens, start, k)  # the head's cost, paid
        first = start + len(next_tokens) + 1
        for i in range(len(out)):
            right = sequence[first + i] if first + i < len(sequence) else 0
            keep = float(torch.rand((), generator=rng)) < acceptance
            out[i] = right if keep else (right + 1) % 500
        return out
    return draft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--k", type=int, default=3, help="the K of the summary line")
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--oracle", default="0.7,0.9", help="oracle-draft acceptances measured too ('' = none)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "qwenpd" / "distilled")
    args = p.parse_args()
    model = cached(args.preset, args.dtype, args.cache_dir, log=lambda s: print(s, file=sys.stderr))
    engine = Engine(model, dtype=args.dtype)
    head = load_head(engine, model)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    ks = [int(k) for k in args.ks.split(",")]
    configs = [("plain", 0, "", None)] + [(f"k={k} {rb}", k, rb, None) for k in ks for rb in ("replay", "snapshot")]
    configs += [(f"k={k} replay, oracle drafts {a:.0%}", k, "replay", a)
                for a in (float(x) for x in args.oracle.split(",") if x) for k in ks]
    rates: dict[str, list[float]] = {name: [] for name, *_ in configs}
    stats: dict[str, list] = {name: [] for name, *_ in configs}
    real_draft = Drafter.draft
    for prompt in prompts(engine, args.prompts, args.prompt):
        ref = None
        for run in range(args.runs):
            for name, k, rb, acceptance in configs:
                if not k:
                    r = generate(engine, prompt, params)
                    ref = ref or r.token_ids
                else:
                    Drafter.draft = real_draft if acceptance is None else oracle(prompt + ref, acceptance, run)
                    try:
                        r = generate_speculative(engine, head, prompt, params, k, rollback=rb)
                    finally:
                        Drafter.draft = real_draft
                    if r.token_ids != ref:
                        raise RuntimeError(f"{name}: tokens differ from plain decoding")
                    stats[name].append(r)
                rates[name].append((len(r.token_ids) - 1) / r.decode_s)
    base = statistics.median(rates["plain"])
    print(f"# {cpu_description()}; {args.preset} {args.dtype} with its distilled MTP head, {torch.get_num_threads()} "
          f"threads; decode of {args.tokens} tokens after {args.prompt}-token prompts, batch 1, eager; "
          f"{args.prompts} prompts x {args.runs} runs")
    print("\n| decoding | tokens/s | vs plain | mean accepted length | acceptance per draft position | "
          "rollback bytes per verify pass |")
    print("|---|---|---|---|---|---|")
    for name, k, _, _ in configs:
        rate = statistics.median(rates[name])
        if not k:
            print(f"| plain | {rate:.1f} | 1.00x | - | - | - |")
            continue
        runs = stats[name]
        steps = sum(r.verify_steps for r in runs)
        length = (sum(r.accepted_tokens for r in runs) + steps) / steps
        # position i is reached only when drafts 0..i-1 were accepted: acceptance there = accepted / reached
        reached = [steps] + [sum(r.accepted_at[i] for r in runs) for i in range(k - 1)]
        per = [sum(r.accepted_at[i] for r in runs) / max(1, reached[i]) for i in range(k)]
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {length:.2f} | "
              f"{', '.join(f'{a:.0%}' for a in per)} | {max(r.rollback_bytes for r in runs) / 1e6:.2f} MB |")
    name = f"k={args.k} replay"
    runs = stats[name]
    steps = sum(r.verify_steps for r in runs)
    length = (sum(r.accepted_tokens for r in runs) + steps) / steps
    print(f"\nspec decode ({args.preset} {args.dtype}, distilled MTP, k={args.k}): "
          f"b1 {statistics.median(rates[name]) / base:.2f}x, b8 not measured, b32 not measured non-speculative; "
          f"mean accepted length {length:.2f}")


if __name__ == "__main__":
    main()
