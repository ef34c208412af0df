"""llguidance against xgrammar on our workload: the per-step token mask for a tokenizer of Qwen3.6's size, and
what a new schema costs before its first mask (every request brings its own schema).

    pip install xgrammar apache-tvm-ffi     # not a dependency of qwenpd: only this comparison needs it
    python bench/grammar_libraries.py [--steps 60] [--words 248000]

Both libraries get the same tokenizer.json (bench/constrained.py's Qwen3.6-sized synthetic one: the embedded
tokenizer plus pseudo-words in the byte-level alphabet) and the same JSON schemas; each walks its own grammar,
taking a seeded random allowed token per step. Median seconds per mask over the steps (the mask filled into the
library's packed bitmask, one row, on this process's threads), and the seconds from schema to first mask.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constrained import qwen_vocab_checkpoint  # noqa: E402 - bench/constrained.py
from machine import cpu_description  # noqa: E402 - bench/machine.py

SCHEMAS = {
    "weather": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 30},
                                                 "note": {"type": "string", "maxLength": 40}},
                "required": ["city", "days", "note"], "additionalProperties": False},
    "records": {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "score": {"type": "number"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "score"]}}}, "required": ["items"]},
}


def _allowed(mask_row: torch.Tensor, words: int) -> list[int]:
    bits = ((mask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:words]
    return torch.nonzero(bits).flatten().tolist()


def run_llguidance(tokenizer_json: str, schema: dict, steps: int, seed: int) -> tuple[float, float]:
    import llguidance
    import llguidance.torch as lt

    tok = llguidance.LLTokenizer(tokenizer_json)
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults={"whitespace_flexible": False}))
    mask = lt.allocate_token_bitmask(1, tok.vocab_size)
    lt.fill_next_token_bitmask(matcher, mask, 0)
    first = time.perf_counter() - t0
    rng, times = random.Random(seed), []
    for _ in range(steps):
        if matcher.is_stopped() or matcher.is_accepting():
            break
        t1 = time.perf_counter()
        lt.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t1)
        matcher.consume_token(rng.choice(_allowed(mask[0], tok.vocab_size)))
    return first, statistics.median(times)


def run_xgrammar(model_dir: Path, schema: dict, steps: int, seed: int) -> tuple[float, float, float]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - t0  # once per tokenizer (a server does it at start)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    first = time.perf_counter() - t0
    rng, times = random.Random(seed), []
    for _ in range(steps):
        if matcher.is_terminated():
            break
        t1 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t1)
        allowed = [t for t in _allowed(mask[0], info.vocab_size) if t != hf.eos_token_id]
        if not allowed:
            break
        matcher.accept_token(rng.choice(allowed))
    return setup, first, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = qwen_vocab_checkpoint(Path(tmp) / "model", "tiny", "float32")
        tokenizer_json = (model / "tokenizer.json").read_text()
        words = len(json.loads(tokenizer_json)["model"]["vocab"])
        rows = []
        for name, schema in SCHEMAS.items():
            ll_first, ll_mask = run_llguidance(tokenizer_json, schema, args.steps, args.seed)
            xg_setup, xg_first, xg_mask = run_xgrammar(model, schema, args.steps, args.seed)
            rows.append((name, ll_first, ll_mask, xg_first, xg_mask, xg_setup))
    print(f"# {cpu_description()}; {torch.get_num_threads()} threads; tokenizer of {words} tokens")
    print("\n| schema | llguidance: schema to first mask | llguidance: mask per step | xgrammar: schema to first "
          "mask | xgrammar: mask per step | xgrammar / llguidance per step |")
    print("|---|---|---|---|---|---|")
    for name, ll_first, ll_mask, xg_first, xg_mask, _ in rows:
        print(f"| {name} | {1e3 * ll_first:.1f} ms | {1e3 * ll_mask:.3f} ms | {1e3 * xg_first:.1f} ms | "
              f"{1e3 * xg_mask:.3f} ms | {xg_mask / ll_mask:.2f} |")
    print(f"\nxgrammar's tokenizer setup (once per server): {rows[0][5]:.2f} s")


if __name__ == "__main__":
    main()
