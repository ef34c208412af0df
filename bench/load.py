"""Bounded load against `qwenpd serve all`: many concurrent clients, mixed prompt lengths, shared prefixes, some
streams cancelled mid-way; then checks that nothing leaked.

    python bench/load.py [--clients 64] [--duration 60] [--warmup 10] [--model DIR] [--threads N] [--seed 0]

Starts `qwenpd serve all` on the tiny model (made in a temporary directory unless --model), runs a warm-up phase
at the same concurrency, records each service's RSS, runs the measured phase, waits for the services to go idle
and prints one table: requests and errors by kind, p50/p99 TTFT (call start -> first chunk, client clock) and
TPOT (per request: first -> last chunk over tokens - 1), RSS after warm-up vs after the run (total, and without
shared memory: the cache's segments are a budgeted cache, not the process's own memory), the store's leases and
allocations left, and shared-memory segments on disk vs those the store knows. Exit status 1 if any check fails.
`run(...)` is the same thing as a function (tests/services/test_load.py runs a short one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.clients import AsyncClient, Cancelled, QwenpdError  # noqa: E402

PROMPT_LENGTHS = (4, 16, 64, 256, 700)  # mixed: most short, some long
SHARED_PREFIX_TOKENS = 300
EXPECTED = {"cancelled"}  # outcomes that are the client's own doing


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    tokens: int = 0


def _prompt(rng: random.Random, prefixes: list[list[int]], vocab: int) -> list[int]:
    suffix = [rng.randrange(10, vocab) for _ in range(rng.choice(PROMPT_LENGTHS))]
    return (rng.choice(prefixes) + suffix) if rng.random() < 0.4 else suffix


async def _one(client: AsyncClient, rng: random.Random, prefixes: list[list[int]], vocab: int, tally: Tally) -> None:
    ids = _prompt(rng, prefixes, vocab)
    options = dict(max_tokens=rng.randint(4, 48), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        options.update(temperature=0.0)
    else:
        options.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 32))
    cancel_after = rng.randint(1, 3) if rng.random() < 0.1 else None
    started = time.perf_counter()
    first = last = None
    n = 0
    try:
        agen = client.stream(token_ids=ids, **options)
        try:
            async for chunk in agen:
                last = time.perf_counter()
                first = first or last
                n += len(chunk.token_ids)
                if cancel_after is not None and n >= cancel_after:
                    break
        finally:
            await agen.aclose()  # cancels the decode call when we stopped early
    except Cancelled:
        tally.outcomes["cancelled"] += 1
    except QwenpdError as exc:
        tally.outcomes[type(exc).__name__] += 1
        return
    except Exception as exc:  # noqa: BLE001 - counted as unexpected
        tally.outcomes[f"python:{type(exc).__name__}"] += 1
        return
    else:
        tally.outcomes["cancelled" if cancel_after is not None and n >= cancel_after else "ok"] += 1
    if first is not None:
        tally.ttft.append(first - started)
        tally.tokens += n
        if n > 1 and cancel_after is None:
            tally.tpot.append((last - first) / (n - 1))


async def load(prefill: str, decode: str, clients: int, duration: float, seed: int, vocab: int) -> Tally:
    """`clients` concurrent loops, each issuing requests back to back until `duration` seconds have passed."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(SHARED_PREFIX_TOKENS)] for _ in range(4)]
    tally = Tally()
    end = time.monotonic() + duration

    async def worker(i: int) -> None:
        wrng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            await _one(client, wrng, prefixes, vocab, tally)

    async with AsyncClient(prefill=prefill, decode=decode, timeout=120) as client:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    return tally


# ---- the services and what they hold --------------------------------------------------------------------------
def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    fields["private"] = fields.get("RssAnon", 0) + fields.get("RssFile", 0)
    return fields


def start_serve_all(model: Path, store_id: str, tmp: Path, threads: int) -> tuple[subprocess.Popen, dict]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "qwenpd.cli", "serve", "all", "--model", str(model),
                             "--store-id", store_id, "--threads", str(threads), "--max-batch", "64",
                             "--ready-file", str(ready), "--log-level", "ERROR"])
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("serve all did not start")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


def wait_idle(info: dict, timeout: float = 30.0) -> tuple[int, int]:
    """Wait until the decode service is idle and the store holds no lease or allocation; (leases, allocations)."""
    from qwenpd.cache_store.client import CacheStoreClient
    from qwenpd.clients import Client

    deadline = time.monotonic() + timeout
    with Client(prefill=info["prefill"], decode=info["decode"], timeout=10) as c, CacheStoreClient(info["cache"]) as s:
        while True:
            load, st = c.load(), s.stats()
            if (not load.active_sequences and not load.queued and not st.leases and not st.allocations) \
                    or time.monotonic() > deadline:
                return st.leases, st.allocations


def store_segments(info: dict, store_id: str) -> tuple[int, int]:
    """(segments the store reports, segment files of this store in /dev/shm)."""
    from qwenpd.cache_store.client import CacheStoreClient

    with CacheStoreClient(info["cache"]) as s:
        known = s.stats().segments
    return known, len(list(Path("/dev/shm").glob(f"qwenpd-{store_id}-*")))


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def run(model: Path, clients: int, duration: float, warmup: float, threads: int = 1, seed: int = 0,
        rss_tolerance: float = 0.10) -> dict:
    """Start serve all, warm up, load, check; the report as a dict (`report["ok"]`: every check passed)."""
    from qwenpd.engine.config import ModelConfig

    vocab = ModelConfig.from_pretrained(model).vocab_size
    store_id = f"load{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        proc, info = start_serve_all(model, store_id, Path(tmp), threads)
        try:
            asyncio.run(load(info["prefill"], info["decode"], clients, warmup, seed + 1, vocab))
            wait_idle(info)
            rss_before = {name: rss_kib(pid) for name, pid in info["children"].items()}
            t0 = time.monotonic()
            tally = asyncio.run(load(info["prefill"], info["decode"], clients, duration, seed, vocab))
            elapsed = time.monotonic() - t0
            leases, allocations = wait_idle(info)
            rss_after = {name: rss_kib(pid) for name, pid in info["children"].items()}
            known, on_disk = store_segments(info, store_id)
        finally:
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(60)
        left_after_stop = len(list(Path("/dev/shm").glob(f"qwenpd-{store_id}-*")))
    unexpected = {k: v for k, v in tally.outcomes.items() if k != "ok" and k not in EXPECTED}
    growth = {name: rss_after[name]["private"] / rss_before[name]["private"] - 1 for name in rss_before}
    report = dict(clients=clients, duration_s=round(elapsed, 1), requests=sum(tally.outcomes.values()),
                  outcomes=dict(tally.outcomes), unexpected=unexpected, tokens=tally.tokens,
                  tokens_per_s=round(tally.tokens / elapsed, 1),
                  ttft_p50_ms=1e3 * percentile(tally.ttft, 50), ttft_p99_ms=1e3 * percentile(tally.ttft, 99),
                  tpot_p50_ms=1e3 * percentile(tally.tpot, 50), tpot_p99_ms=1e3 * percentile(tally.tpot, 99),
                  rss_before_kib=rss_before, rss_after_kib=rss_after, rss_private_growth=growth,
                  leases_left=leases, allocations_left=allocations, segments_known=known, segments_on_disk=on_disk,
                  segments_after_stop=left_after_stop, exit_code=exit_code)
    report["ok"] = (not unexpected and leases == 0 and allocations == 0 and known == on_disk
                    and left_after_stop == 0 and exit_code == 0 and all(g <= rss_tolerance for g in growth.values()))
    return report


def print_table(r: dict) -> None:
    rows = [("clients x duration", f"{r['clients']} x {r['duration_s']} s"),
            ("requests", f"{r['requests']}  ({', '.join(f'{k} {v}' for k, v in sorted(r['outcomes'].items()))})"),
            ("unexpected failures", str(sum(r["unexpected"].values())) + (f"  {r['unexpected']}" if r["unexpected"] else "")),
            ("tokens streamed", f"{r['tokens']}  ({r['tokens_per_s']} tok/s)"),
            ("TTFT p50 / p99", f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} ms"),
            ("TPOT p50 / p99", f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} ms")]
    for name in r["rss_before_kib"]:
        b, a = r["rss_before_kib"][name], r["rss_after_kib"][name]
        rows.append((f"RSS {name} warm -> after", f"{b['VmRSS'] / 1024:.0f} -> {a['VmRSS'] / 1024:.0f} MiB "
                     f"(private {b['private'] / 1024:.0f} -> {a['private'] / 1024:.0f} MiB, "
                     f"{100 * r['rss_private_growth'][name]:+.1f}%)"))
    rows += [("leases / allocations left", f"{r['leases_left']} / {r['allocations_left']}"),
             ("segments: store / /dev/shm", f"{r['segments_known']} / {r['segments_on_disk']}"),
             ("segments after SIGTERM, exit", f"{r['segments_after_stop']}, exit {r['exit_code']}"),
             ("all checks", "PASS" if r["ok"] else "FAIL")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"| {k:<{width}} | {v}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a fresh tiny model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of prefill and of decode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from qwenpd.engine.init_model import init_model

            model = init_model(Path(tmp) / "tiny", "tiny", seed=0)
        report = run(model, args.clients, args.duration, args.warmup, args.threads, args.seed)
    print_table(report)
    if args.json:
        print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
