"""Hybrid prefix cache through the services: cold vs warm TTFT on prompts whose first 15/16 are shared.

    python bench/prefix_cache.py [--quick] [--preset small] [--threads N] [--model DIR]

For each prompt length L: request 1 = shared + suffix A (cold: the cache holds nothing of it), request 2 =
shared + suffix B (warm: reuses KV blocks + the DeltaNet snapshot request 1 left), request 3 = shared + suffix C
(reuses the snapshot request 2 took where it left request 1's KV chain; median of three such). TTFT is the client's clock from the
call to the first token. Beside it, the warm floor measured in-process on the same checkpoint: restoring the
cached state (copying its bytes) + encoding the uncached suffix + one decode step. Then what the cache stores:
bytes per cached token, and one DeltaNet snapshot against one KV block.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.cache_store.client import CacheStoreClient  # noqa: E402
from qwenpd.clients.client import Client  # noqa: E402
from qwenpd.supervisor import ServiceSet  # noqa: E402
from qwenpd.engine import DecodeBatch, Engine, HybridState  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as pb  # noqa: E402

BLOCK, INTERVAL = 256, 2048


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def warm_floor(engine: Engine, prompt: list[int], cached: int, reps: int = 3) -> tuple[float, float, float]:
    """(restore, suffix prefill, one decode step) seconds, in-process: the least a warm request can cost."""
    _, full = engine.prefill(prompt[:cached], chunk_size=BLOCK * 8)
    blocks = [full.kv_tensors(i, min(i + BLOCK, cached)) for i in range(0, cached, BLOCK)]
    snap = full.deltanet_tensors()
    restore, suffix, step = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        state = HybridState.from_prefix(engine.config, blocks, snap, cached, engine.kv_cache)
        t1 = time.perf_counter()
        logits, state = engine.prefill(prompt[cached:], state, chunk_size=BLOCK * 8)
        t2 = time.perf_counter()
        batch = DecodeBatch(engine, 1)
        batch.add(state)
        t3 = time.perf_counter()
        batch.step([int(logits.argmax())])
        t4 = time.perf_counter()
        restore.append(t1 - t0)
        suffix.append(t2 - t1)
        step.append(t4 - t3)
    return min(restore), min(suffix), min(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", help="existing checkpoint (default: init the preset, bf16, into a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1K and 4K prompts only")
    args = ap.parse_args()
    lengths = [1024, 4096] if args.quick else [1024, 4096, 8192]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(init_model(Path(tmp) / "model", args.preset, dtype="bfloat16"))
        engine = Engine(model, threads=args.threads)
        vocab = engine.config.vocab_size
        rows, store_rows = [], []
        with ServiceSet.build(model, threads=args.threads, store_id="benchprefix", log_level="WARNING",
                        block_size=BLOCK, snapshot_interval=INTERVAL, budget="8GiB") as services, \
                Client(prefill=services.prefill, decode=services.decode, timeout=600) as client, \
                CacheStoreClient(services.cache) as store:
            client.generate(token_ids=_tokens(300, 0, vocab), max_tokens=2)  # warm-up (first segment, threads)
            for n in lengths:
                shared = _tokens(n * 15 // 16, n, vocab)
                prompts = [shared + _tokens(n - len(shared), n + k, vocab) for k in range(1, 6)]
                before = {k.kind: (k.entries, k.bytes) for k in store.stats().by_kind}
                results = [client.generate(token_ids=p, max_tokens=2, temperature=0) for p in prompts[:1]]
                after = {k.kind: (k.entries, k.bytes) for k in store.stats().by_kind}
                results += [client.generate(token_ids=p, max_tokens=2, temperature=0) for p in prompts[1:]]
                third = sorted(results[2:], key=lambda r: r.ttft_s)[len(results[2:]) // 2]  # median of 3
                floor = warm_floor(engine, prompts[2], third.cached_tokens)
                rows.append((n, len(shared), (results[0], results[1], third), floor))
                delta = {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1])
                         for k in after}
                store_rows.append((n, delta))

    print(f"\n## prefix cache, {args.preset} preset, bf16, {args.threads} threads, block {BLOCK}, "
          f"snapshot every {INTERVAL} + last boundary inside + divergence point")
    print("| prompt | shared | cold TTFT | warm TTFT (2nd) | cached | warm/cold | warm TTFT (3rd) | cached | "
          "warm/cold | floor (restore+suffix+step) | 3rd/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, shared, (c, w2, w3), (r, s, st) in rows:
        floor = r + s + st
        print(f"| {n} | {shared} | {c.ttft_s * 1e3:.0f} ms | {w2.ttft_s * 1e3:.0f} ms | {w2.cached_tokens} | "
              f"1/{c.ttft_s / w2.ttft_s:.1f} | {w3.ttft_s * 1e3:.0f} ms | {w3.cached_tokens} | "
              f"1/{c.ttft_s / w3.ttft_s:.1f} | {floor * 1e3:.0f} ms ({r * 1e3:.1f}+{s * 1e3:.0f}+{st * 1e3:.0f}) | "
              f"{w3.ttft_s / floor:.2f}x |")
    print("\n| prompt | KV blocks written | KV bytes / cached token | snapshots written | bytes / snapshot | "
          "one snapshot = KV of |")
    print("|---|---|---|---|---|---|")
    for n, delta in store_rows:
        kv_n, kv_b = delta.get(pb.ENTRY_KIND_KV_BLOCK, (0, 0))
        sn_n, sn_b = delta.get(pb.ENTRY_KIND_SNAPSHOT, (0, 0))
        per_tok = kv_b / (kv_n * BLOCK) if kv_n else 0.0
        per_snap = sn_b / sn_n if sn_n else 0.0
        print(f"| {n} | {kv_n} | {per_tok:,.0f} B | {sn_n} | {per_snap / 2**20:.2f} MiB | "
              f"{per_snap / per_tok if per_tok else 0:,.0f} tokens ({per_snap / (per_tok * BLOCK) if per_tok else 0:.1f} "
              f"blocks) |")


if __name__ == "__main__":
    main()
