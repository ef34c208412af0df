"""Speculative decoding with the MTP head against plain decoding, in one run, on the distilled `small` checkpoint.

    python bench/spec_decode.py [--preset small] [--dtype bfloat16] [--k 3] [--prompt 512] [--tokens 128] [--runs 3]
                                [--compile]

The checkpoint is init-model's `preset` with its MTP head distilled by bench/distill_mtp.py (cached; made on first
use, ~10 min for small on 2 cores). Prompts are 512 tokens of the kind the head was distilled on: 32 random
tokens continued greedily by the model itself. For each prompt: plain `generate` (batch 1, eager) and
`generate_speculative` with K = 1..4 and each rollback (the default, "auto", and the two it chooses between; the
oracle rows and the summary line: "auto"), runs interleaved; every speculative run is checked to give plain
decoding's tokens. Table: decode tokens/s (median over runs and prompts), the ratio to plain decoding measured in
the same run, the mean accepted length (tokens emitted per verify pass: accepted drafts + 1), the
acceptance per draft position, and the bytes a verify pass keeps for undoing rejected drafts.

A head distilled on a random-weight model drafts poorly (its held-out agreement with the model is a few percent:
there is little for a one-layer head to learn about a random model's next-but-one token), so the table also has
rows with *oracle* drafts at a set acceptance (`--oracle`): the head runs as usual (its cost is paid) and each of
its drafts is then replaced by the token plain decoding chooses there with that probability (seeded), else by a
wrong one. They measure what the machinery costs and gains at a given acceptance, not a head's quality.

The second table runs the decode service's own stepping loop (decode_service/runner.py DecodeRunner, in process,
no gRPC) at batch 1, 8 and 32: B sequences prefilled (with the head's state, as the prefill service hands it off)
and decoded together, plain (no head) against speculative two ways: with every step drafting
(--speculative-max-batch lifted, --speculative-policy always: where drafting stops paying) and as served (the
decode service's defaults: the adaptive policy of decode_service/policy.py under the default
--speculative-max-batch, its policy warmed by one untimed run first, as a serving process's is by the requests
before), each with its own tokens checked against plain decoding. The summary line is the served one;
"sequence steps drafting" is the share of sequence steps that verified drafts.

`--compile`: both tables on compiled graphs (`--compile` of the services: regional, the decode graphs, compiled
for the verify passes' rows too), plain and speculative on the same compiled engine; a separate run from the
eager one (each table's ratios are within its own run).

`--num-layers N` runs the preset cut or grown to N layers (init-model's --num-layers) with its *random* MTP head
(not distilled: its rows say so), for the oracle rows: the head is one decoder layer whatever the depth, so on
`small`'s 8 layers three drafts cost about a third of a decode step, on Qwen3.6-27B's 64 about a twentieth. N = 32
shows what the machinery gains where the head is a realistic share of the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_mtp import cached  # noqa: E402 - bench/distill_mtp.py
from machine import cpu_description  # noqa: E402 - bench/machine.py

from qwenpd.engine import Engine  # noqa: E402
from qwenpd.engine.generate import generate, generate_speculative  # noqa: E402
from qwenpd.engine.sampling import SamplingParams  # noqa: E402
from qwenpd.engine.speculative import Drafter  # noqa: E402
from qwenpd.decode_service import runner as runner_mod  # noqa: E402
from qwenpd.decode_service.config import DecodeConfig  # noqa: E402
from qwenpd.decode_service.policy import SpeculationPolicy  # noqa: E402
from qwenpd.service_config import field_defaults  # noqa: E402


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


class Loaded:
    """The engine and head of the stepping-loop table, loaded on the first runner's thread (`get`), so that this
    process's main thread does no torch work: a second thread with its own OpenMP pool slows the stepping thread's
    small ops (~25% per token on 2 cores), and the decode service too keeps all of it on one thread."""

    def __init__(self, model: Path, dtype: str, compiled: tuple[int, int, tuple[int, int]] | None = None,
                 quantize: dict | None = None):
        self.model, self.dtype, self.compiled, self.quantize = model, dtype, compiled, quantize
        self.engine = self.head = None

    def get(self):
        if self.engine is None:
            self.engine = engine_for(self.model, self.dtype, self.compiled, self.quantize)
            self.head = self.engine.draft_head
        return self.engine


def engine_for(model: Path, dtype: str, compiled: tuple[int, int, tuple[int, int]] | None,
               quantize: dict | None = None) -> Engine:
    """The eager engine, or (compiled = (max_batch, context, verify)) one whose decode graphs are compiled for
    batches of up to max_batch sequences of `context` tokens and verify passes of up to verify = (sequences, tokens
    each), as the decode service compiles them (the warm-up is printed to stderr). `quantize`: the engine's
    quantize and draft_quantize options."""
    quantize = quantize or {}
    if compiled is None:
        return Engine(model, dtype=dtype, speculative=True, **quantize)
    from qwenpd.engine.engine_config import MAX_SPECULATIVE_TOKENS, EngineConfig
    from qwenpd.engine.kv_cache import kv_cache_bytes_for

    max_batch, context, verify = compiled
    # the head's layers in every page; the KV the drafts write past a sequence's last token
    config = EngineConfig(model_dir=str(model), dtype=dtype, speculative=True)
    kv = max_batch * kv_cache_bytes_for(config, context + MAX_SPECULATIVE_TOKENS)
    engine = Engine(model, dtype=dtype, kv_cache_bytes=kv, speculative=True, **quantize)
    seconds = engine.compile(engine.default_buckets(512, max_batch, max_context=context), max_batch,
                             graphs=("decode",), verify=verify)
    print(f"compiled {engine.runner.buckets} in {seconds:.0f} s", file=sys.stderr)
    return engine


def deeper(preset: str, dtype: str, num_layers: int, cache_dir: Path) -> Path:
    """init-model's `preset` at `num_layers` layers, its MTP head random (cached)."""
    from qwenpd.engine.init_model import init_model

    out = cache_dir / f"{preset}-{dtype}-{num_layers}-layers"
    if not (out / "config.json").is_file():
        init_model(out, preset, seed=0, dtype=dtype, num_layers=num_layers)
    return out


def run_batch(loaded: Loaded, prompts_: list[list[int]], params: SamplingParams, k: int,
              refs: list[list[int]] | None = None, acceptance: float | None = None, seed: int = 0,
              served: "bool | SpeculationPolicy" = False):
    """The prompts decoded together by a DecodeRunner (k = 0: plain), every prefill on its stepping thread (as a
    joining sequence's load); tokens/s counts the time in decode steps. `served`: the decode service's defaults
    (the adaptive policy, --speculative-max-batch's default; a SpeculationPolicy: that one, warm from earlier
    runs), else every step drafts. Returns (decode tokens/s,
    token ids per sequence, (drafting sequence steps, accepted drafts, accepted per draft position))."""
    import threading

    from qwenpd.decode_service.runner import DecodeRunner, DecodeSequence, ReadGuard
    from qwenpd.engine.pages import kv_tokens
    from qwenpd.engine.mtp import PromptDrafts
    from qwenpd.engine.output import OutputTracker
    from qwenpd.engine.sampling import Sampler

    seqs, outs = [], {}

    def prefill(seq: DecodeSequence, prompt: list[int]):
        engine = loaded.get()
        engine.draft_head = loaded.head if k else None
        seq.sampler = Sampler.resumed(params, 0, engine.eos_token_ids, grammars=engine.grammars, prompt=prompt)
        seq.tracker = OutputTracker(params, engine.eos_token_ids, None, prompt)
        seq.max_context = engine.config.max_position_embeddings
        state = engine.new_state()
        feed = PromptDrafts(loaded.head, prompt, state) if k else None
        logits, state = engine.prefill(prompt, state, normed=feed)
        state.reserve(seq.kv_tokens)  # as the decode service's admission does (the drafts' KV included)
        token, logprob = seq.sampler.sample(logits)
        seq.push(token, logprob)
        seq.draft = feed.tensors() if feed is not None else None
        outs[seq.request_id] = [token]
        return state

    for i, prompt in enumerate(prompts_):
        seq = DecodeSequence(request_id=str(i), load=lambda: None, guard=ReadGuard(lambda: None), sampler=None,
                             tracker=None, next_token=0, num_tokens=len(prompt), max_context=0,
                             kv_tokens=kv_tokens(len(prompt), 0, params.max_tokens, 1 << 30, k))
        seq.load = lambda seq=seq, prompt=prompt: prefill(seq, prompt)
        seqs.append(seq)
    finished = threading.Event()
    verified = [0, 0, [0] * max(k, 1)]

    def deliver(items):
        for seq, out in items:
            outs[seq.request_id] += out.token_ids
        if all(s.finish_reason is not None for s in seqs):
            finished.set()

    def on_verify(n, drafted, at):
        verified[0] += n
        verified[1] += sum(at)
        for i, a in enumerate(at):
            verified[2][i] += a

    current: dict = {}
    plain_drafter, plain_class = runner_mod.DecodeRunner._drafter, runner_mod.Drafter
    if acceptance is not None:
        rng = torch.Generator().manual_seed(seed)

        def drafter_of(self, seq):
            current["ids"] = prompts_[int(seq.request_id)] + refs[int(seq.request_id)]
            return plain_drafter(self, seq)

        class Oracle(plain_class):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.ids = current["ids"]

            def draft(self, hidden, next_tokens, start, kk):  # the first drafts, at join
                return self.draft_many([self], [hidden], [next_tokens], [start], kk)[0]

            @classmethod
            def draft_many(cls, drafters, hidden, next_tokens, starts, kk):
                real = plain_class.draft_many(drafters, hidden, next_tokens, starts, kk)  # the head's cost, paid
                for d, tokens, start, out in zip(drafters, next_tokens, starts, real):
                    first = start + len(tokens) + 1
                    for i in range(len(out)):
                        right = d.ids[first + i] if first + i < len(d.ids) else 0
                        out[i] = right if float(torch.rand((), generator=rng)) < acceptance else (right + 1) % 500
                return real

            @classmethod
            def read_many(cls, drafters, hidden, next_tokens, starts):  # the head's cost paid, scored as drafted
                _, scored = plain_class.read_many(drafters, hidden, next_tokens, starts)
                return int((torch.rand(scored, generator=rng) < acceptance).sum()), scored

        runner_mod.DecodeRunner._drafter, runner_mod.Drafter = drafter_of, Oracle
    defaults = field_defaults(DecodeConfig)
    runner = DecodeRunner(loaded.get, loaded.compiled[0] if loaded.compiled else len(prompts_), len(prompts_),
                          deliver, num_speculative_tokens=k,
                          speculative_max_batch=defaults.speculative_max_batch if served else len(prompts_),
                          speculative_policy=(served if not isinstance(served, bool) else
                                              defaults.speculative_policy if served else "always"))
    runner.on_verify = on_verify
    stepping = [0.0]
    step = runner._step

    def timed_step():
        t = time.perf_counter()
        try:
            return step()
        finally:
            stepping[0] += time.perf_counter() - t

    runner._step = timed_step
    try:
        runner.start()
        for seq in seqs:
            runner.submit(seq)
        if not finished.wait(3600):
            raise RuntimeError("batch did not finish")
    finally:
        runner.stop()
        runner_mod.DecodeRunner._drafter, runner_mod.Drafter = plain_drafter, plain_class
    elapsed = stepping[0]
    ids = [outs[str(i)] for i in range(len(prompts_))]
    return sum(len(x) - 1 for x in ids) / elapsed, ids, verified


def batched_table(loaded: Loaded, args, params) -> dict[int, float]:
    """Plain against speculative decoding in the decode service's stepping loop at each batch size; returns the
    distilled head's ratio per batch size."""
    batches = [int(b) for b in args.batches.split(",") if b]
    g = torch.Generator().manual_seed(4321)  # prompts as `prompts` makes them, continued in one batch
    starts = [torch.randint(3, args.words, (32,), generator=g).tolist() for _ in range(max(batches))]
    _, continued, _ = run_batch(loaded, starts, SamplingParams(temperature=0, max_tokens=args.prompt - 32,
                                                               ignore_eos=True), 0)
    pool = [s + c for s, c in zip(starts, continued)]
    acceptances = [None] + [float(x) for x in args.oracle.split(",") if x]
    print(f"# {cpu_description()}; {args.preset}{f' at {args.num_layers} layers' if args.num_layers else ''} "
          f"{args.dtype}, {torch.get_num_threads()} threads; the decode "
          f"service's stepping loop (in process), {args.tokens} tokens after {args.prompt}-token prompts, "
          f"{mode(args)}, every step drafting; {args.runs} runs")
    print(f"\n| batch | decoding (k={args.k}) | policy | tokens/s | vs plain at this batch | mean accepted length | "
          "acceptance per draft position | sequence steps drafting |")
    print("|---|---|---|---|---|---|---|---|")
    ratios: dict[str, dict[int, float]] = {"served": {}, "always": {}}
    for b in batches:
        group = pool[:b]
        rates: dict = {}
        for run in range(args.runs):
            base, refs, _ = run_batch(loaded, group, params, 0)
            rates.setdefault("plain", []).append(base)
            for a in acceptances:
                if (a, "policy") not in rates:  # a serving process's policy, warmed by one run first (untimed)
                    defaults = field_defaults(DecodeConfig)
                    rates[(a, "policy")] = SpeculationPolicy(args.k, defaults.speculative_max_batch,
                                                             defaults.speculative_policy)
                    run_batch(loaded, group, params, args.k, refs, a, seed=99, served=rates[(a, "policy")])
                for served in (False, True):
                    rate, ids, v = run_batch(loaded, group, params, args.k, refs, a, seed=run,
                                             served=rates[(a, "policy")] if served else False)
                    if ids != refs:
                        raise RuntimeError(f"batch {b}: speculative tokens differ from plain decoding")
                    rates.setdefault((a, served), []).append((rate, v))
        plain = statistics.median(rates["plain"])
        print(f"| {b} | plain | - | {plain:.1f} | 1.00x | - | - | - |")
        for a in acceptances:
            for served in (False, True):
                runs = rates[(a, served)]
                rate = statistics.median(r for r, _ in runs)
                steps = sum(v[0] for _, v in runs)
                accepted = sum(v[1] for _, v in runs)
                at = [sum(v[2][i] for _, v in runs) for i in range(args.k)]
                reached = [steps] + at[:-1]
                per = ", ".join(f"{x / max(1, r):.0%}" for x, r in zip(at, reached))
                name = (("random head" if args.num_layers else "distilled head") if a is None
                        else f"oracle drafts {a:.0%}")
                share = steps / (len(runs) * b * args.tokens)  # of the sequence steps plain decoding takes
                print(f"| {b} | {name} | {'served' if served else 'every step'} | {rate:.1f} | {rate / plain:.2f}x | "
                      f"{1 + accepted / max(1, steps):.2f} | {per} | {share:.0%} |")
                if a is None:
                    ratios["served" if served else "always"][b] = rate / plain
        sys.stdout.flush()
    return ratios


def mode(args) -> str:
    return ("compiled" if args.compile else "eager") + "".join(
        f", --{name.replace('_', '-')} {value}" for name, value in quantized(args).items())


def quantized(args) -> dict:
    """The engine options --quantize and --draft-quantize give (both sides of every ratio)."""
    return {name: value for name, value in (("quantize", args.quantize), ("draft_quantize", args.draft_quantize))
            if value}


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
    p.add_argument("--batches", default="1,8,32", help="batch sizes of the stepping-loop table ('' = none)")
    p.add_argument("--skip-b1-table", action="store_true", help="only the stepping-loop table")
    p.add_argument("--compile", action="store_true", help="compiled graphs instead of eager (module doc)")
    p.add_argument("--quantize", choices=["int8"], help="the engine (and so its head) quantized at load: both sides "
                   "of every ratio")
    p.add_argument("--draft-quantize", choices=["int8"], help="the head alone quantized at load (the model's weights "
                   "as stored): plain decoding runs the same weights, speculation drafts with an int8 head")
    p.add_argument("--num-layers", type=int, default=0,
                   help="the preset at this depth with its random MTP head (module doc; 0 = the distilled preset)")
    args = p.parse_args()
    made: list[Path] = []  # distilled (if not cached yet) on a thread that ends: the main thread stays torch-free
    worker = threading.Thread(target=lambda: made.append(
        deeper(args.preset, args.dtype, args.num_layers, args.cache_dir) if args.num_layers else
        cached(args.preset, args.dtype, args.cache_dir, log=lambda s: print(s, file=sys.stderr))))
    worker.start()
    worker.join()
    model = made[0]
    from qwenpd.engine.tokenizer import Tokenizer

    args.words = Tokenizer(model).vocab_size if (model / "tokenizer.json").is_file() else 500
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    # the stepping-loop table first, before this thread does torch work (Loaded)
    context = args.prompt + args.tokens
    batches = [int(b) for b in args.batches.split(",") if b]
    many = (max(batches), context, (max(batches), args.k + 1)) if args.compile and batches else None
    ratios = batched_table(Loaded(model, args.dtype, many, quantized(args)), args, params) if batches else {}
    ks = [int(k) for k in args.ks.split(",")]
    engine = engine_for(model, args.dtype, (1, context, (1, max(ks) + 1)) if args.compile else None, quantized(args))
    head = engine.draft_head
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    configs = [("plain", 0, "", None)] + [(f"k={k} {rb}", k, rb, None) for k in ks
                                          for rb in ("auto", "replay", "snapshot")]
    configs += [(f"k={k} auto, oracle drafts {a:.0%}", k, "auto", a)
                for a in (float(x) for x in args.oracle.split(",") if x) for k in ks]
    if args.skip_b1_table:
        configs = configs[:1] + [c for c in configs if c[1] == args.k and c[2] == "auto" and c[3] is None]
        args.prompts = 1
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
    print(f"\n# {cpu_description()}; {args.preset} {args.dtype} with its "
          f"{f'random MTP head, {args.num_layers} layers' if args.num_layers else 'distilled MTP head'}, "
          f"{torch.get_num_threads()} "
          f"threads; decode of {args.tokens} tokens after {args.prompt}-token prompts, batch 1, {mode(args)}; "
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
    name = f"k={args.k} auto"  # the default rollback
    runs = stats[name]
    steps = sum(r.verify_steps for r in runs)
    length = (sum(r.accepted_tokens for r in runs) + steps) / steps

    def ratio(b: int, policy: str = "served") -> str:
        return f"{ratios[policy][b]:.2f}x" if b in ratios.get(policy, {}) else "not measured"

    head_kind = f"{args.num_layers} layers, random MTP" if args.num_layers else "distilled MTP"
    print(f"\nevery step drafting ({mode(args)}): b1 {ratio(1, 'always')}, b8 {ratio(8, 'always')}, "
          f"b32 {ratio(32, 'always')}; generate b1 {statistics.median(rates[name]) / base:.2f}x")
    print(f"spec decode ({args.preset} {args.dtype}, {head_kind}, k={args.k}, {mode(args)}, as served): "
          f"b1 {ratio(1)}, b8 {ratio(8)}, b32 {ratio(32)} non-speculative; mean accepted length {length:.2f}")


if __name__ == "__main__":
    main()
