"""Sizing on paper: weights, state, hand-off and decode capacity of the real models on trn2, per tensor-parallel rank.

    python bench/sizing.py [--models qwen3.6-27b,qwen3.5-2b] [--tp 1,2,4,8,16] [--host-gbps 50]
                           [--reserve-gib 4] [--page-size 64] [--prompt 4096] [--output 512] [--no-measure]

Everything is arithmetic from the presets' shapes (engine/config.py) and the tensor-parallel plan
(engine/tp/plan.py: what each rank holds and writes), in bf16 with the DeltaNet recurrent state in fp32, plus one
measurement: this machine's memcpy bandwidth (a 1 GiB torch copy). Nothing here ran on trn2.

trn2 figures (AWS Neuron docs, Trainium2 architecture): a chip has 8 physical NeuronCores, 96 GiB of HBM at
2.9 TB/s and 667 dense BF16 TFLOPS; at LNC=2 it is 4 logical cores, so one logical core is taken as 24 GiB,
725 GB/s and 167 TFLOPS. trn2.48xlarge: 16 chips = 64 logical cores; trn2.3xlarge: 1 chip = 4 logical cores.

Rates (assumptions, flags): prefill tokens/s per logical core defaults to the one trn2 measurement at hand, the
public NxDI/vLLM Qwen3.6-27B contrib (aws-neuron PR #164: ~590 tok/s cold prefill at 4K-16K on one trn2.3xlarge,
TP 4 at LNC=2, so ~148 tok/s per logical core), scaled to other models by FLOPs per token. Decode is taken as
bandwidth-bound: a step reads every rank's weights and the batch's KV + DeltaNet state at `--mbu` of the HBM
bandwidth; the default 0.31 is what that contrib's batch-1 decode implies (26.3 tok/s = 38 ms/step over ~34 GB
of FP8-MLP weights on 4 cores). Collectives, host overheads and prefill/decode interference are not modelled.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.engine.pages import pages_for  # noqa: E402
from qwenpd.engine.config import ModelConfig, preset  # noqa: E402
from qwenpd.engine.tp.plan import Range, ShardingError, ShardPlan  # noqa: E402
from qwenpd.engine import state_spec  # noqa: E402
from qwenpd.engine.state_spec import shapes as expected_shapes  # noqa: E402
from qwenpd.engine.weights import expected_weight_shapes, quantized_names  # noqa: E402

GIB, GB = 1 << 30, 1e9
CORE_HBM = 24 * GIB               # one logical NeuronCore at LNC=2: 96 GiB / 4
CORE_HBM_BPS = 2.9e12 / 4         # 2.9 TB/s per chip
CORE_BF16_FLOPS = 667e12 / 4      # dense BF16 per chip
REF_PREFILL_TOK_S_PER_CORE = 590 / 4  # aws-neuron PR #164, Qwen3.6-27B, trn2.3xlarge TP 4
INSTANCES = {"trn2.48xlarge": 64, "trn2.3xlarge": 4}  # logical cores at LNC=2


# ---- bytes from the shapes and the sharding plan ----------------------------------------------------------------
def _numel(shape: tuple[int, ...], ranges: list[Range] | None) -> int:
    """Elements of the slices `ranges` of a tensor of `shape` (the whole tensor for None)."""
    if ranges is None:
        return math.prod(shape)
    return sum((stop - start) * math.prod(shape) // shape[dim] for dim, start, stop in ranges)


WEIGHTS = {"format": "bf16"}  # --weights: bf16, fp8 or fp8-mlp (main sets it)


def weight_bytes(c: ModelConfig, plan: ShardPlan | None, replicated_only: bool = False) -> int:
    """Bytes of the weights one rank holds (the whole model for plan None), in --weights' format: bf16, or the
    fine-grained FP8 of the published checkpoint (1 byte per element and one fp32 scale per 128x128 block of the
    decoder projections --quantize fp8 / fp8-mlp quantizes; the rest bf16)."""
    fmt = WEIGHTS["format"]
    fp8 = quantized_names(expected_weight_shapes(c), None if fmt == "bf16" else fmt)
    total = 0
    for name, shape in expected_weight_shapes(c).items():
        ranges = plan.weight_ranges(name) if plan else None
        if not replicated_only or (plan and ranges is None):
            n = _numel(shape, ranges)
            total += n + 4 * -(-n // (128 * 128)) if name in fp8 else 2 * n
    return total


def state_bytes(c: ModelConfig, tokens: int, plan: ShardPlan | None, kinds: tuple[str, ...],
                written: bool = False) -> int:
    """Bytes of the hand-off state tensors of `kinds` (k, v, conv, recurrent) after `tokens` tokens: all of them
    (plan None), what one rank holds (its state_ranges), or what it writes into a shared checkpoint."""
    total = 0
    for name, shape in expected_shapes(c, tokens).items():
        kind = state_spec.kind_of(name)
        if kind.name not in kinds:
            continue
        if plan is None:
            ranges = None
        else:
            ranges = [r for r, _ in plan.write_ranges(name)] if written else plan.state_ranges(name)
        total += kind.dtype(torch.bfloat16).itemsize * _numel(shape, ranges)
    return total


def kv_per_token(c: ModelConfig, plan: ShardPlan | None) -> int:
    return state_bytes(c, 1, plan, state_spec.KV_KINDS)


def deltanet_per_seq(c: ModelConfig, plan: ShardPlan | None) -> int:
    return state_bytes(c, 1, plan, state_spec.DELTANET_KINDS)


def plan_or_reason(c: ModelConfig, tp: int) -> ShardPlan | str:
    try:
        return ShardPlan(c, tp, 0)
    except ShardingError as e:
        return str(e).replace("tensor-parallel degree", "TP")


def flops_per_token(c: ModelConfig, context: int) -> float:
    """Prefill FLOPs per token: 2 x matmul weights (embedding lookup excluded) + attention scores and values over
    half the context on average; DeltaNet's recurrence (< 1% here) is left out."""
    matmul = c.num_parameters() - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    attention = 4 * len(c.attention_layers) * c.num_attention_heads * c.head_dim * context / 2
    return 2 * matmul + attention


# ---- this machine -------------------------------------------------------------------------------------------------
def measure_memcpy_gbps(nbytes: int = GIB, repeat: int = 5) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / GB


# ---- printing -----------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


# ---- per-model tables ----------------------------------------------------------------------------------------------
def describe(c: ModelConfig, name: str) -> None:
    embed = c.vocab_size * c.hidden_size
    print(f"## {name}: {c.num_hidden_layers} layers ({len(c.linear_layers)} DeltaNet + {len(c.attention_layers)} "
          f"attention), {c.num_parameters() / 1e9:.2f} G text parameters ({embed / 1e9:.2f} G embedding"
          f"{', tied' if c.tie_word_embeddings else ' + the same again in lm_head'}), bf16\n")


def weights_table(c: ModelConfig, tps: list[int], reserve: int) -> None:
    total = weight_bytes(c, None)
    rows = [["total", gb(total), "", "", f"{total / CORE_HBM:.2f}x", ""]]
    for tp in tps:
        plan = plan_or_reason(c, tp)
        if isinstance(plan, str):
            rows.append([f"TP {tp}", "—", "", "", "", plan])
            continue
        w, rep = weight_bytes(c, plan), weight_bytes(c, plan, replicated_only=True)
        left = CORE_HBM - w - reserve
        rows.append([f"TP {tp}", gb(w), gb(rep), f"{total / w:.2f}x", f"{w / CORE_HBM:.0%}",
                     gb(left) if left > 0 else "does not fit"])
    print("Weights per rank (one rank = one logical core):")
    table(["", "bytes", "of which replicated (embedding, norms)", "total / rank", "of 24 GiB",
           f"left for KV + state ({reserve / GIB:g} GiB reserved)"], rows)


def state_table(c: ModelConfig, tps: list[int], page_size: int) -> None:
    rows = [["total", f"{kv_per_token(c, None):,} B", mib(deltanet_per_seq(c, None)),
             mib(page_size * kv_per_token(c, None)), f"{deltanet_per_seq(c, None) / kv_per_token(c, None):,.0f}"]]
    for tp in tps:
        plan = plan_or_reason(c, tp)
        if isinstance(plan, str):
            continue
        kv, dn = kv_per_token(c, plan), deltanet_per_seq(c, plan)
        rows.append([f"TP {tp} (per rank)", f"{kv:,} B", mib(dn), mib(page_size * kv), f"{dn / kv:,.0f}"])
    print("State: KV (attention layers only) per token, DeltaNet state (conv bf16 + recurrent fp32) per sequence:")
    table(["", "KV / token", "DeltaNet / sequence", f"KV page ({page_size} tokens)", "DeltaNet = KV of N tokens"],
          rows)


def rollback_bytes(c: ModelConfig, k: int, mode: str, plan: ShardPlan | None = None) -> int:
    """What a verify pass of k drafts keeps per sequence to undo rejected ones (engine/speculative.py, its two-part
    pass on the reference kernels with the C++ step kernel), per DeltaNet layer: every position's prepared step inputs (fp32: q and k
    repeated to the value heads, k again, v, and per head e^g, beta and q.k) and the sequence's conv inputs (model
    dtype, bf16 here: its conv state after any accepted count is a slice of them), plus one copy of the
    recurrent state ("replay") or one per position ("snapshot"). The MTP head's own KV is not counted here (more layers
    of every KV page: rollback_table prints it). Rows that pad a pass to the row multiple (engine/runner.py
    decode_row_multiple; 1 on Qwen3.6-27B) are not counted. tests/engine/test_sizing.py checks it against what a
    verify pass keeps."""
    local = c if plan is None else plan.local_config
    rows = k + 1
    hv, dk, dv = local.linear_num_value_heads, local.linear_key_head_dim, local.linear_value_head_dim
    prepared = rows * hv * (3 * dk + dv + 3) * 4
    history = local.conv_dim * (local.linear_conv_kernel_dim - 1 + rows) * torch.bfloat16.itemsize
    recurrent = state_bytes(c, 1, plan, ("recurrent",))
    return len(c.linear_layers) * (prepared + history) + (rows if mode == "snapshot" else 1) * recurrent


def rollback_table(c: ModelConfig, tps: list[int], ks: tuple[int, ...] = (1, 2, 3, 4)) -> None:
    rows = []
    for tp in sorted({1, *tps}):
        plan = None if tp == 1 else plan_or_reason(c, tp)
        if isinstance(plan, str):
            continue
        rows.append([f"TP {tp}" + (" (per rank)" if tp > 1 else "")]
                    + [f"{mib(rollback_bytes(c, k, 'replay', plan))} / {mib(rollback_bytes(c, k, 'snapshot', plan))}"
                       for k in ks])
    print("Speculative decoding: bytes a verify pass keeps per sequence to undo rejected drafts, replay / snapshot "
          "(engine/speculative.py):")
    table([""] + [f"K = {k}" for k in ks], rows)
    head = 2 * c.mtp_num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.bfloat16.itemsize
    print(f"The MTP head's KV: {head:,} B a token ({head / kv_per_token(c, None):.1%} on top of the model's KV; "
          "more layers of every KV page, held whole on a tensor-parallel leader: engine/kv_cache.py).\n")


def handoff_table(c: ModelConfig, tps: list[int], contexts: list[int], host_bps: float,
                  memcpy_bps: float | None) -> None:
    rows = []
    kinds = tuple(state_spec.KINDS)
    for ctx in contexts:
        total = state_bytes(c, ctx, None, kinds)
        cells = [f"{ctx // 1024}K", mib(total), ms(total / host_bps),
                 ms(total / memcpy_bps) if memcpy_bps else "—"]
        per_rank = []
        for tp in tps:
            plan = plan_or_reason(c, tp)
            if isinstance(plan, str):
                continue
            plans = [ShardPlan(c, tp, r) for r in range(tp)]
            wrote = max(state_bytes(c, ctx, p, kinds, written=True) for p in plans)
            read = max(state_bytes(c, ctx, p, kinds) for p in plans)
            per_rank.append(f"TP {tp}: {mib(wrote)} / {mib(read)}")
        rows.append(cells + ["; ".join(per_rank)])
    print(f"Hand-off checkpoint per request (full K/V + DeltaNet state at the prompt end), time for one pass over "
          f"host memory at {host_bps / GB:g} GB/s (--host-gbps) and at this machine's measured memcpy:")
    table(["prompt", "bytes", f"at {host_bps / GB:g} GB/s", "at measured memcpy",
           "largest per-rank write (prefill) / read (decode)"], rows)


# ---- decode capacity and the prefill/decode split --------------------------------------------------------------------
def decode_group(c: ModelConfig, tp: int, context: int, args: argparse.Namespace) -> dict | None:
    """One decode instance of `tp` logical cores at `context` tokens per sequence; None if its weights do not fit."""
    plan = plan_or_reason(c, tp)
    if isinstance(plan, str):
        return None
    w = weight_bytes(c, plan)
    free = CORE_HBM - w - args.reserve_gib * GIB
    kv, dn = kv_per_token(c, plan), deltanet_per_seq(c, plan)
    page = args.page_size * kv
    per_seq = pages_for(context, args.page_size) * page + dn
    if free < per_seq:
        return None
    seqs = int(free // per_seq)
    batch = min(seqs, args.max_batch)
    streamed = w - c.vocab_size * c.hidden_size * 2 + batch * (context * kv + dn)  # embedding: one row per token
    step = streamed / (CORE_HBM_BPS * args.mbu)
    return {"tp": tp, "free": free, "pages": int(free // page), "seqs": seqs, "batch": batch, "step": step,
            "tok_s": batch / step}


def prefill_rate(c: ModelConfig, context: int, args: argparse.Namespace) -> float:
    """Prefill tokens/s per logical core: the reference rate scaled by FLOPs per token."""
    ref = flops_per_token(preset("qwen3.6-27b"), 8192)  # the reference's rate held over 4K-16K prompts
    return args.prefill_tok_s_per_core * ref / flops_per_token(c, context)


def capacity_table(c: ModelConfig, tps: list[int], contexts: list[int], args: argparse.Namespace) -> None:
    rows = []
    for tp in tps:
        groups = [decode_group(c, tp, ctx, args) for ctx in contexts]
        if groups[0] is None and decode_group(c, tp, 1, args) is None:
            rows.append([f"TP {tp}", "—", "—"] + ["—"] * len(contexts))
            continue
        g1 = decode_group(c, tp, 1, args)
        cells = [f"TP {tp}", gb(g1["free"]), f"{g1['pages']:,}"]
        for g in groups:
            cells.append("does not fit" if g is None else
                         f"{g['seqs']:,} ({g['seqs'] / tp:,.1f} per core); batch {g['batch']}: "
                         f"{g['step'] * 1e3:,.0f} ms/step, {g['tok_s']:,.0f} tok/s")
        rows.append(cells)
    print(f"Decode instance of TP logical cores ({args.reserve_gib:g} GiB per core reserved for activations and the "
          f"runtime; pages of {args.page_size} tokens; step time = bytes read / ({CORE_HBM_BPS / GB:,.0f} GB/s x "
          f"{args.mbu:g}), batch capped at {args.max_batch}):")
    table(["decode TP", "free HBM per core", "KV pages per core"] +
          [f"max sequences at {ctx // 1024}K" for ctx in contexts], rows)


def split_table(c: ModelConfig, instance: str, cores: int, tps: list[int], context: int,
                args: argparse.Namespace) -> None:
    """Every (prefill TP, decode TP) that fits on `instance`: cores sized so prefill and decode keep pace with
    each other for prompts of `context` tokens and --output generated tokens."""
    rate = prefill_rate(c, context, args)
    prefill_tps = [tp for tp in tps if not isinstance(plan_or_reason(c, tp), str) and
                   CORE_HBM - weight_bytes(c, ShardPlan(c, tp, 0)) - args.reserve_gib * GIB > 0]
    decode_groups = [g for g in (decode_group(c, tp, context + args.output, args) for tp in tps) if g]
    title = f"{instance} ({cores} logical cores), {context // 1024}K-token prompts, {args.output} tokens out"
    if not prefill_tps or not decode_groups or min(prefill_tps) + decode_groups[0]["tp"] > cores:
        need = (f"prefill needs a TP {min(prefill_tps)} group and decode a TP {decode_groups[0]['tp']} group"
                if prefill_tps and decode_groups else "no TP degree fits the weights")
        print(f"{title}: does not fit ({need}: {min(prefill_tps or [0]) + (decode_groups or [{'tp': 0}])[0]['tp']}"
              f" of {cores} logical cores of 24 GiB)\n")
        return
    rows = []
    for tp_p in prefill_tps:
        for g in decode_groups:
            tp_d = g["tp"]
            if tp_p + tp_d > cores:
                continue
            # core-seconds per request on each side; cores split in that ratio, in whole TP groups
            pre, dec = context / rate, args.output * tp_d / g["tok_s"]
            n_p = max(tp_p, round(cores * pre / (pre + dec) / tp_p) * tp_p)
            n_p = min(n_p, (cores - tp_d) // tp_p * tp_p)
            n_d = (cores - n_p) // tp_d * tp_d
            req_s, ttft = min(n_p / pre, n_d / dec), context / (rate * tp_p)
            row = [f"{tp_p} x {n_p // tp_p}", f"{tp_d} x {n_d // tp_d}", f"{n_p}:{n_d}", f"{req_s:,.2f}",
                   f"{ttft:,.1f} s", f"{g['batch']}", f"{1 / g['step']:,.1f}"]
            # ranked by requests/s (2% steps); then groups within one chip (AWS's advice: keep TP 4 within a
            # chip; the all-reduces, which this paper model leaves out, stay on the chip), then the shorter TTFT
            rows.append(((round(math.log(req_s) / math.log(1.02)), max(tp_p, tp_d) <= 4, -ttft), row))
    rows.sort(key=lambda r: r[0], reverse=True)
    print(f"{title}; prefill {rate:,.0f} tok/s per core (assumed), decode as above:")
    table(["prefill TP x instances", "decode TP x instances", "cores P:D", "requests/s", "TTFT (prefill)",
           "decode batch per instance", "tok/s per sequence", ""],
          [row + (["best" if i == 0 else ""]) for i, (_, row) in enumerate(rows[:8])])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3.6-27b,qwen3.5-2b", help="presets to size")
    ap.add_argument("--tp", default="1,2,4,8,16", help="tensor-parallel degrees")
    ap.add_argument("--contexts", default="4096,32768", help="prompt lengths for hand-off and capacity")
    ap.add_argument("--output", type=int, default=512, help="generated tokens per request (split)")
    ap.add_argument("--host-gbps", type=float, default=50.0, help="host-memory bandwidth for the hand-off, GB/s")
    ap.add_argument("--reserve-gib", type=float, default=4.0,
                    help="HBM per logical core kept for activations, compiled graphs and the runtime (GiB)")
    ap.add_argument("--page-size", type=int, default=64, help="KV page size in tokens (engine default 64)")
    ap.add_argument("--max-batch", type=int, default=64, help="largest decode batch (compiled bucket)")
    ap.add_argument("--mbu", type=float, default=0.31, help="fraction of HBM bandwidth a decode step reaches")
    ap.add_argument("--prefill-tok-s-per-core", type=float, default=REF_PREFILL_TOK_S_PER_CORE,
                    help="Qwen3.6-27B prefill tokens/s per logical core (other models scaled by FLOPs)")
    ap.add_argument("--no-measure", action="store_true", help="skip the memcpy measurement")
    ap.add_argument("--weights", choices=("bf16", "fp8", "fp8-mlp"), default="bf16",
                    help="weight format: bf16, or the published fine-grained FP8 of every decoder projection (fp8) "
                         "or of the MLP only (fp8-mlp, the trn2 reference's long-context path)")
    args = ap.parse_args()
    WEIGHTS["format"] = args.weights
    tps = [int(x) for x in args.tp.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    memcpy = None if args.no_measure else measure_memcpy_gbps() * GB
    print(f"# Sizing on paper ({args.weights} weights, bf16 KV, fp32 DeltaNet recurrent state)\n")
    print(f"this machine: memcpy {memcpy / GB:,.1f} GB/s (1 GiB torch copy, {torch.get_num_threads()} threads, "
          f"median of 5)\n" if memcpy else "memcpy not measured (--no-measure)\n")
    for name in args.models.split(","):
        c = preset(name)
        describe(c, name)
        weights_table(c, tps, int(args.reserve_gib * GIB))
        state_table(c, tps, args.page_size)
        rollback_table(c, tps)
        handoff_table(c, tps, contexts, args.host_gbps * GB, memcpy)
        capacity_table(c, tps, contexts, args)
        for instance, cores in INSTANCES.items():
            for ctx in contexts:
                split_table(c, instance, cores, [t for t in tps if t <= cores], ctx, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
