"""Engine throughput vs transformers on the same checkpoint, dtype and thread count, in one run.

    python bench/engine.py [--preset small] [--dtype bfloat16|float32|both] [--quick] [--no-compile] [--whole-graphs]
                           [--tp 2] [--quantize int8,fp8] [--batches 1,8,32] [--prefill-lengths 512,2048]

Prints prefill tokens/s at several prompt lengths and decode tokens/s at several batch sizes for qwenpd eager,
qwenpd compiled (torch.compile over static buckets, paged KV; its warm-up time is printed) and transformers
(`generate` with its cache), with ratios; beside them the CPU model and its bf16 ISA, the plain bf16/fp32 matmul
throughput of the model's shapes and the memory-read bandwidth this machine reaches, as ceilings. `--quantize`
adds, for each mode, the engine quantized at load (eager, and compiled unless --no-compile) with its ratio to the
same engine unquantized, measured in the same run, and the weight bytes each holds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.engine import DecodeBatch, Engine  # noqa: E402
from qwenpd.engine.pages import pages_for  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402
from qwenpd.engine.runner import Buckets  # noqa: E402

from machine import cpu_description  # noqa: E402 - bench/machine.py


def compiled_engine(model_dir: Path, dtype_name: str, args, quantize: str | None = None) -> tuple[Engine, float]:
    """The engine compiled over exactly the shapes this benchmark runs; returns it and its warm-up seconds."""
    longest = max(max(args.prefill_lengths), args.decode_prompt + args.steps + 2)
    eng = Engine(model_dir, dtype=dtype_name, kv_cache_bytes=args.kv_cache_bytes, quantize=quantize)
    page = eng.kv_cache.page_size
    widths = sorted({pages_for(args.decode_prompt + args.steps + 2, page), pages_for(longest, page)})
    chunks = sorted({min(length, args.chunk_size) for length in args.prefill_lengths})
    buckets = Buckets(tuple(chunks), tuple(args.batches), tuple(widths))
    return eng, eng.compile(buckets, max_batch=max(args.batches), regional=False if args.whole_graphs else None)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(cfg, dtype, tokens: int) -> float:
    """Plain torch.matmul over the model's projection shapes at `tokens` rows: the compute ceiling."""
    h = cfg.hidden_size
    shapes = [(h, 2 * cfg.intermediate_size), (cfg.intermediate_size, h), (h, cfg.conv_dim + cfg.linear_value_dim)]
    mats = [(torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for k, n in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    for a, b in mats:
        a @ b
    t = _best(lambda: [a @ b for a, b in mats], 3)
    return flops / t / 1e9


def read_bandwidth_gbs() -> float:
    x = torch.ones(256 * 2**20 // 4, dtype=torch.float32)  # 256 MiB, well past the caches
    x.sum()
    t = _best(lambda: x.sum(), 5)
    return x.numel() * 4 / t / 1e9


def prompts(n: int, length: int, vocab: int, vary: bool) -> list[list[int]]:
    g = torch.Generator().manual_seed(length * 31 + n)
    lens = [max(8, length - (i * length) // (2 * n)) if vary else length for i in range(n)]
    return [torch.randint(10, vocab, (L,), generator=g).tolist() for L in lens]


def _threads(eng: Engine) -> None:
    """A sharded engine's rank 0 runs on its share of the cores (set while it is measured), the rest on all."""
    torch.set_num_threads(eng.engine_config.threads or _ALL_THREADS)


_ALL_THREADS = torch.get_num_threads()


def ours_prefill(eng: Engine, ids: list[int], chunk: int) -> float:
    _threads(eng)
    try:
        return _best(lambda: eng.prefill(ids, chunk_size=chunk), 2)
    finally:
        torch.set_num_threads(_ALL_THREADS)


def ours_decode(eng: Engine, batch: list[list[int]], steps: int) -> float:
    _threads(eng)
    try:
        return _decode(eng, batch, steps)
    finally:
        torch.set_num_threads(_ALL_THREADS)


def _decode(eng: Engine, batch: list[list[int]], steps: int) -> float:
    db = DecodeBatch(eng, len(batch))
    last = []
    for p in batch:
        logits, st = eng.prefill(p, chunk_size=2048)
        db.add(st)
        last.append(int(logits.argmax()))
    db.step(last)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        last = db.step(last).argmax(-1).tolist()
    return time.perf_counter() - t0


def hf_prefill(hf, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        return _best(lambda: hf(x, use_cache=True, logits_to_keep=1), 2)


def hf_decode(hf, batch: list[list[int]], steps: int) -> float:
    """Decode time of transformers' generate: (N+1 new tokens) - (1 new token), left-padded batch, each the best
    of two after one untimed call."""
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(new_tokens: int) -> float:
        return _best(lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw), 2)

    with torch.inference_mode():
        timed(1)  # untimed: the first call at a new batch shape pays one-time costs the difference must not hold
        return timed(steps + 1) - timed(1)


def run(model_dir: Path, dtype_name: str, args) -> None:
    from transformers import Qwen3_5ForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    threads = torch.get_num_threads()
    engines = {"eager": Engine(model_dir, dtype=dtype_name)}
    warmup = None
    if args.tp > 1:  # the sharded engine beside the unsharded one: its ranks split the same cores
        engines[f"tp{args.tp}"] = Engine(model_dir, dtype=dtype_name, tp=args.tp, threads=max(1, threads // args.tp))
        torch.set_num_threads(threads)
    elif not args.no_compile:
        engines["compiled"], warmup = compiled_engine(model_dir, dtype_name, args)
    baseline = {}  # a quantized engine's column -> the unquantized one it is compared with
    for mode in args.quantize:
        engines[f"eager {mode}"] = Engine(model_dir, dtype=dtype_name, quantize=mode)
        baseline[f"eager {mode}"] = "eager"
        if "compiled" in engines:
            engines[f"compiled {mode}"] = compiled_engine(model_dir, dtype_name, args, mode)[0]
            baseline[f"compiled {mode}"] = "compiled"
    cfg = engines["eager"].config
    if args.no_transformers:  # what the eager engine holds, less an untied embedding (looked up, not streamed)
        hf = None
        embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * dtype.itemsize
        weight_bytes = engines["eager"].weight_bytes - embedding
    else:
        hf = Qwen3_5ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed" not in n)
    print(f"\n## {args.preset} preset, {dtype_name}, {torch.get_num_threads()} threads, "
          f"{cfg.num_parameters() / 1e6:.0f}M params")
    print(cpu_description())
    if warmup is not None:
        kind = "whole graphs" if args.whole_graphs else "regions on CPU"
        print(f"compiled ({kind}): {engines['compiled'].runner.buckets} warmed up in {warmup:.1f} s")
    for tokens in () if args.no_transformers else (128, 512):
        first, second = first_and_second_request(model_dir, dtype_name, tokens)
        print(f"first request after load (fresh process): prefill of {tokens} tokens {first * 1e3:.0f} ms, the "
              f"second {second * 1e3:.0f} ms: {first / second:.2f}x")
    names = list(engines)
    if baseline:
        print("weights held: " + ", ".join(f"{n} {engines[n].weight_bytes / 1e6:,.0f} MB" for n in names))
        kernels = {n: e.int8_kernel for n, e in engines.items() if getattr(e, "int8_kernel", None)}
        if kernels:
            print("int8 decode-step kernel: " + ", ".join(f"{n} {k}" for n, k in kernels.items())
                  + " (qwenpd-amx: kernels/amx_linear; qwenpd: kernels/int8_matmul; aten: aten::_weight_int8pack_mm; "
                  "QWENPD_AMX_LINEAR=0 leaves out the first, QWENPD_INT8_KERNEL=0 the second)")
    pairs = [(names.index(q), names.index(b)) for q, b in baseline.items()]
    print("| measure | " + " | ".join(f"qwenpd {n}" for n in names) + " | transformers | " +
          " | ".join(f"{n} / transformers" for n in names) + "".join(f" | {q} / {b}" for q, b in baseline.items())
          + " |")
    print("|---|" + "---|" * (2 * len(names) + 1 + len(baseline)))
    best = {}
    comm: dict[int, tuple[float, float]] = {}
    for length in args.prefill_lengths:
        ids = prompts(1, length, cfg.vocab_size, False)[0]
        ours = [length / ours_prefill(engines[n], ids, args.chunk_size) for n in names]
        theirs = None if hf is None else length / hf_prefill(hf, ids)
        _row(f"prefill {length} tok (tok/s)", ours, theirs, "{:,.0f}", pairs)
        if length == 2048:
            best["prefill_2048"] = max(ours)
    for bsz in args.batches:
        batch = prompts(bsz, args.decode_prompt, cfg.vocab_size, vary=bsz > 1)
        seconds = [float("inf")] * len(names)
        for _ in range(args.repeats):  # the engines in turn, each one's best: this machine drifts minute to minute
            seconds = [min(t, ours_decode(engines[n], batch, args.steps)) for t, n in zip(seconds, names)]
        ours = [bsz * args.steps / t for t in seconds]
        theirs = None if hf is None else bsz * args.steps / hf_decode(hf, batch, args.steps)
        _row(f"decode batch {bsz} (tok/s)", ours, theirs, "{:,.1f}", pairs)
        if bsz == 1:
            step_s = 1 / max(ours)
        if args.tp > 1:
            sharded = engines[f"tp{args.tp}"]
            comm[bsz] = (sharded.measure_collectives(bsz), bsz / ours[names.index(f"tp{args.tp}")])
    prefill_2048 = best.get("prefill_2048", 0.0)
    mm = matmul_gflops(cfg, dtype, 2048)
    bw = read_bandwidth_gbs()
    if 2048 in args.prefill_lengths:
        # matmul FLOPs per prompt token: every weight but the embedding table (lm_head runs on the last token only)
        per_token = 2 * (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2))
        achieved = per_token * prefill_2048 / 1e9
        print(f"\nprefill@2048 (best engine): ~{achieved:,.0f} GFLOP/s (2 x non-embedding params x tok/s; attention and DeltaNet "
              f"recurrence excluded) vs plain "
              f"torch.matmul of the model's shapes {mm:,.0f} GFLOP/s = {achieved / mm:.0%}")
    for bsz, (coll_s, step) in comm.items():
        print(f"tp{args.tp} decode@{bsz}: {step * 1e3:.1f} ms/step, of which collectives alone "
              f"{coll_s * 1e3:.2f} ms = {coll_s / step:.0%} (1 + 2 x {cfg.num_hidden_layers} all-reduces of "
              f"[{bsz}, {cfg.hidden_size}] fp32 + the logits' all-gather)")
    for eng in engines.values():
        eng.close()
    if 1 in args.batches:
        streamed = weight_bytes / step_s / 1e9
        print(f"decode@1 (best engine): {step_s * 1e3:.1f} ms/step, weights streamed {streamed:.1f} GB/s vs measured read "
              f"bandwidth {bw:.1f} GB/s = {streamed / bw:.0%} ({weight_bytes / 1e9:.2f} GB of weights/step)")


_FIRST_AND_SECOND = """
import json, sys, time
from qwenpd.engine.engine import Engine
engine = Engine(sys.argv[1], dtype=sys.argv[2])
times = []
for _ in range(2):
    t0 = time.perf_counter()
    _, state = engine.prefill([1 + i % 1000 for i in range(int(sys.argv[3]))])
    times.append(time.perf_counter() - t0)
    state.release()
print(json.dumps(times))
"""


def first_and_second_request(model_dir: Path, dtype_name: str, tokens: int) -> tuple[float, float]:
    """Seconds of the first and second prefill of `tokens` tokens in a fresh process, right after Engine() returns:
    what a service's first caller and the next one wait (the one-time work belongs in loading, not in the first)."""
    run = subprocess.run([sys.executable, "-c", _FIRST_AND_SECOND, str(model_dir), dtype_name, str(tokens)], check=True,
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    first, second = json.loads(run.stdout.splitlines()[-1])
    return first, second


def _row(label: str, ours: list[float], theirs: float | None, fmt: str, pairs: list[tuple[int, int]]) -> None:
    """One table row; `pairs` (quantized, unquantized) column indices add their ratios. `theirs` None: not run."""
    if theirs is None:
        cells = [fmt.format(x) for x in ours] + ["—"] * (len(ours) + 1)
    else:
        cells = [fmt.format(x) for x in ours] + [fmt.format(theirs)] + [f"{x / theirs:.2f}x" for x in ours]
    cells += [f"{ours[q] / ours[b]:.2f}x" for q, b in pairs]
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="both", choices=["bfloat16", "float32", "both"])
    ap.add_argument("--model", help="existing checkpoint dir (default: init the preset into a temp dir)")
    ap.add_argument("--quick", action="store_true", help="shorter prompts and fewer steps")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled engine")
    ap.add_argument("--whole-graphs", action="store_true", help="compile one graph per bucket on CPU too (default "
                    "there: one region per layer kind; slower warm-up, faster steps)")
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="KV cache of the compiled engine")
    ap.add_argument("--tp", type=int, default=1, help="also run the engine sharded over this many ranks (instead "
                    "of the compiled column); prints the collectives' share of a decode step")
    ap.add_argument("--quantize", default="", help="comma-separated --quantize modes to add beside the plain engine")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--no-transformers", action="store_true", help="leave out transformers and the fresh-process "
                    "first-request timing (a model too large to hold twice)")
    ap.add_argument("--num-layers", type=int, help="cut the preset to this many layers (bench/sizing.py shapes)")
    ap.add_argument("--repeats", type=int, default=1, help="decode runs per engine and batch, in turn (the best)")
    ap.add_argument("--steps", type=int, help="decode steps per run (default 32; --quick 8)")
    ap.add_argument("--prefill-lengths", default="", help="prompt lengths (default 512,2048,8192; --quick 512,2048)")
    args = ap.parse_args()
    args.quantize = [m for m in args.quantize.split(",") if m]
    args.prefill_lengths = ([int(n) for n in args.prefill_lengths.split(",")] if args.prefill_lengths
                            else [512, 2048] if args.quick else [512, 2048, 8192])
    args.batches = [int(b) for b in args.batches.split(",")]
    args.steps = args.steps or (8 if args.quick else 32)
    args.decode_prompt = 128 if args.quick else 512
    dtypes = ["bfloat16", "float32"] if args.dtype == "both" else [args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        for name in dtypes:
            model_dir = Path(args.model) if args.model else init_model(Path(tmp) / name, args.preset, dtype=name,
                                                                                 num_layers=args.num_layers)
            run(model_dir, name, args)


if __name__ == "__main__":
    main()
