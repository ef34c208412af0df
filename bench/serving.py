"""Serving overhead: the gRPC services (cache store + prefill + decode processes) vs the in-process engine, in one
run on the same checkpoint, dtype and thread count.

    python bench/serving.py [--quick] [--preset small] [--dtype bfloat16] [--threads N] [--model DIR]

Prints one table:
  - TTFT at a 512-token prompt: in-process prefill + first-token sampling vs a Prefill call (client clock, hand-off
    checkpoint written before the response) -> ratio and overhead in ms;
  - TPOT at one stream: in-process `engine.generate` loop vs a Decode stream (client clock);
  - aggregate decode tokens/s at 1/8/32 concurrent streams: in-process DecodeBatch steps with the same per-token
    work (greedy pick + OutputTracker) vs that many concurrent Decode streams through gRPC;
  - hand-off (write into shared memory + lease/map/verify + load into a decode batch slot + release) vs one memcpy
    of the same bytes, with the breakdown;
  - the gateway beside the direct client (same services, same run): time to the first streamed chunk at a
    512-token prompt and aggregate tokens/s of 1/32 concurrent whole requests (prefill + decode), through
    `Client` (prefill and decode called directly), the gateway's gRPC Generate, and its HTTP API (SSE streaming).
The in-process runs happen while the services sit idle, so both sides get the whole machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.cache_store.checkpoint import CheckpointMeta  # noqa: E402
from qwenpd.cache_store.client import CacheStoreClient  # noqa: E402
from qwenpd.clients.client import Client  # noqa: E402
from qwenpd.supervisor import ServiceSet  # noqa: E402
from qwenpd.engine import DecodeBatch, Engine  # noqa: E402
from qwenpd.engine.generate import generate
from qwenpd.engine.output import OutputTracker  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402
from qwenpd.engine.sampling import Sampler, SamplingParams, greedy_batch  # noqa: E402
from qwenpd.engine import state_spec  # noqa: E402
from qwenpd.decode_service.state import state_from_checkpoint  # noqa: E402
from qwenpd.protos.qwenpd.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


def ids_of(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def median_of(fn, repeats: int) -> float:
    fn()  # warm
    return statistics.median(fn() for _ in range(repeats))


def paired(fa, fb, repeats: int) -> tuple[float, float]:
    """Medians of fa() and fb() measured alternately, so both see the same background load."""
    fa(), fb()  # warm
    a, b = [], []
    for _ in range(repeats):
        a.append(fa())
        b.append(fb())
    return statistics.median(a), statistics.median(b)


# ---- in-process ------------------------------------------------------------------------------------------------
def inproc_ttft(eng: Engine, ids: list[int], chunk: int) -> float:
    t0 = time.perf_counter()
    logits, _ = eng.prefill(ids, chunk_size=chunk)
    Sampler(GREEDY).sample(logits)
    return time.perf_counter() - t0


def inproc_tpot(eng: Engine, ids: list[int], tokens: int) -> float:
    r = generate(eng, ids, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    return r.decode_s / (tokens - 1)


def inproc_decode_tps(eng: Engine, prompts: list[list[int]], steps: int) -> float:
    """Aggregate tokens/s of one DecodeBatch with the service's per-token work: greedy pick + OutputTracker."""
    batch = DecodeBatch(eng, len(prompts))
    trackers, last = [], []
    for p in prompts:
        logits, state = eng.prefill(p)
        batch.add(state)
        trackers.append(OutputTracker(GREEDY, eng.eos_token_ids, eng.tokenizer, p))
        last.append(int(logits.argmax()))
    batch.step(last)  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        last, logprobs = greedy_batch(batch.step(last))
        for tracker, token, lp in zip(trackers, last, logprobs, strict=True):
            tracker.push(token, lp)
    return len(prompts) * steps / (time.perf_counter() - t0)


def handoff(eng: Engine, store: CacheStoreClient, num_tokens: int, repeats: int) -> dict[str, float]:
    """The decode service's hand-off path for a state of `num_tokens` tokens (random contents), through the
    running cache store, vs one memcpy of the checkpoint's bytes. write = put_checkpoint (AllocateSegment, copy +
    checksum into shared memory, CommitCheckpoint); map = get_checkpoint (AcquireLease, map, verify checksums);
    load = copy into decode state + DecodeBatch.add; release (ReleaseLease + delete) is off the critical path."""
    cfg, g = eng.config, torch.Generator().manual_seed(num_tokens)
    dtypes = state_spec.dtypes(cfg, eng.dtype)
    tensors = {name: torch.randn(shape, generator=g).to(dtypes[name])
               for name, shape in state_spec.shapes(cfg, num_tokens).items()}
    state = eng.state_from_tensors(tensors, num_tokens)
    meta = CheckpointMeta(eng.fingerprint, num_tokens, {"bench": "1"})
    batch = DecodeBatch(eng, 1)
    rows: list[dict[str, float]] = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        ckpt_id = store.put_checkpoint(state.to_tensors(), meta, handoff_ttl_s=0)
        t1 = time.perf_counter()
        leased = store.get_checkpoint(ckpt_id, eng.fingerprint, lambda n: state_spec.shapes(cfg, n), dtypes)
        t2 = time.perf_counter()
        loaded = state_from_checkpoint(cfg, leased.tensors, leased.num_tokens, eng.kv_cache)
        batch.add(loaded)
        t3 = time.perf_counter()
        leased.tensors.clear()
        store.release(leased, delete=True)
        t4 = time.perf_counter()
        batch.remove(loaded)
        loaded.release()
        rows.append({"write": t1 - t0, "map": t2 - t1, "load": t3 - t2, "release": t4 - t3, "total": t3 - t0})
    rows = rows[1:]
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["rpc"] = median_of(lambda: _timed(store.stats), repeats)
    nbytes = sum(t.numel() * t.element_size() for t in state.to_tensors().values())
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    out["memcpy"] = median_of(lambda: _timed(lambda: dst.copy_(src)), repeats * 3)
    out["bytes"] = nbytes
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- through the services ------------------------------------------------------------------------------------------
async def grpc_decode_tps(prefill: str, decode: str, prompts: list[list[int]], tokens: int) -> float:
    """Prefill every prompt, then open all Decode streams at once; (tokens - 1) per stream come from decode steps."""
    import grpc

    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    async with grpc.aio.insecure_channel(prefill) as pch, grpc.aio.insecure_channel(decode) as dch:
        pstub, dstub = prefill_pb2_grpc.PrefillServiceStub(pch), decode_pb2_grpc.DecodeServiceStub(dch)
        handles = [await pstub.Prefill(prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=p),
                                                                  sampling=sampling), timeout=600)
                   for p in prompts]

        async def stream(checkpoint_id: str) -> int:
            n = 0
            async for chunk in dstub.Decode(decode_pb2.DecodeRequest(checkpoint_id=checkpoint_id), timeout=600):
                n += len(chunk.token_ids)
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(stream(h.checkpoint_id) for h in handles))
        elapsed = time.perf_counter() - t0
    assert all(n == tokens for n in counts), counts
    return len(prompts) * (tokens - 1) / elapsed


# ---- the gateway beside the direct client ----------------------------------------------------------------------------
async def direct_stream(client, ids: list[int], tokens: int) -> tuple[float, int]:
    """(seconds to the first chunk, tokens) of one streamed request through AsyncClient."""
    t0, first, n = time.perf_counter(), None, 0
    async for chunk in client.stream(token_ids=ids, max_tokens=tokens, temperature=0, ignore_eos=True):
        first = first or time.perf_counter()
        n += len(chunk.token_ids)
    return first - t0, n


async def grpc_stream(stub, ids: list[int], tokens: int) -> tuple[float, int]:
    from qwenpd.protos.qwenpd.v1 import generate_pb2

    request = generate_pb2.GenerateRequest(token_ids=prefill_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(
        temperature=0, max_tokens=tokens, ignore_eos=True))
    t0, first, n = time.perf_counter(), None, 0
    async for chunk in stub.Generate(request, timeout=600):
        first = first or time.perf_counter()
        n += len(chunk.token_ids)
    return first - t0, n


async def http_stream(http, model: str, ids: list[int], tokens: int) -> tuple[float, int]:
    """SSE streaming through /v1/completions; tokens counted from usage (include_usage)."""
    import json

    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, first, n = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or time.perf_counter()
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
    return first - t0, n


async def gateway_rows(svc, vocab: int, prompt512: list[int], tokens: int, repeats: int) -> list[tuple]:
    import grpc
    import httpx

    from qwenpd.clients.client import AsyncClient
    from qwenpd.protos.qwenpd.v1 import generate_pb2_grpc

    async with AsyncClient(svc.prefill, svc.decode, timeout=600) as client, \
            grpc.aio.insecure_channel(svc.gateway) as ch, \
            httpx.AsyncClient(base_url=f"http://{svc.http}", timeout=600) as http:
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        paths = {"direct": lambda ids, n: direct_stream(client, ids, n),
                 "gRPC": lambda ids, n: grpc_stream(stub, ids, n),
                 "HTTP": lambda ids, n: http_stream(http, model, ids, n)}
        ttft: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(repeats + 1):  # alternating, first round is warm-up
            for name, run in paths.items():
                ttft[name].append((await run(prompt512, 1))[0])
        rows = [("time to first chunk, 512-token prompt (ms)",
                 *(statistics.median(v[1:]) * 1e3 for v in ttft.values()))]
        for streams in (1, 32):
            prompts = [ids_of(64, vocab, 300 + i) for i in range(streams)]
            tps: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(max(1, repeats // 2) + 1):  # the paths take turns, so they share the background load
                for name, run in paths.items():
                    t0 = time.perf_counter()
                    counts = await asyncio.gather(*(run(p, tokens) for p in prompts))
                    tps[name].append(sum(n for _, n in counts) / (time.perf_counter() - t0))
                    assert all(n == tokens for _, n in counts), (name, counts)
            rows.append((f"tokens/s, {streams} concurrent requests", *(statistics.median(v[1:]) for v in tps.values())))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--model", help="existing checkpoint dir (default: init the preset into a temp dir)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, each side (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    ap.add_argument("--gateway-only", action="store_true", help="only the gateway table")
    args = ap.parse_args()
    repeats, decode_repeats, tokens, decode_prompt = (3, 1, 16, 64) if args.quick else (7, 3, 64, 128)
    handoff_lengths = [512] if args.quick else [512, 4096, 32768]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else init_model(Path(tmp) / args.preset, args.preset, dtype=args.dtype)
        eng = Engine(model, dtype=args.dtype, threads=args.threads)
        vocab = eng.config.vocab_size
        prompt512 = ids_of(512, vocab, 1)
        print(f"# bench/serving.py: {args.preset} preset, {args.dtype}, {args.threads} torch threads per side, "
              f"{'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs, load average at start "
              f"{os.getloadavg()[0]:.2f}")
        rows = []
        # prefix cache off: this measures transport and hand-off overhead on identical work (the repeated TTFT
        # prompt would otherwise be a cache hit); bench/prefix_cache.py measures the cache
        with ServiceSet.build(str(model), dtype=args.dtype, threads=args.threads, max_batch=32, prefix_cache=False,
                              store_id=f"bench{os.getpid()}", log_level="WARNING", gateway=True) as svc, \
                Client(prefill=svc.prefill, decode=svc.decode, timeout=600) as client, \
                CacheStoreClient(svc.cache) as store:
            handoffs = []
            if not args.gateway_only:
                a, b = paired(lambda: inproc_ttft(eng, prompt512, 512),
                              lambda: client.generate(token_ids=prompt512, max_tokens=1, temperature=0).ttft_s,
                              repeats)
                rows.append(("TTFT, 512-token prompt (ms)", a * 1e3, b * 1e3,
                             f"{b / a:.3f}x (+{(b - a) * 1e3:.1f} ms)"))
                short = ids_of(decode_prompt, vocab, 2)
                a, b = paired(lambda: inproc_tpot(eng, short, tokens),
                              lambda: client.generate(token_ids=short, max_tokens=tokens, temperature=0,
                                                      ignore_eos=True).tpot_s, repeats)
                rows.append(("TPOT, 1 stream (ms)", a * 1e3, b * 1e3, f"{b / a:.3f}x"))
                for streams in (1, 8, 32):
                    prompts = [ids_of(decode_prompt, vocab, 100 + i) for i in range(streams)]
                    a, b = paired(lambda p=prompts: inproc_decode_tps(eng, p, tokens),
                                  lambda p=prompts: asyncio.run(grpc_decode_tps(svc.prefill, svc.decode, p, tokens)),
                                  decode_repeats)
                    rows.append((f"decode tokens/s, {streams} streams", a, b, f"{b / a:.1%} of in-process"))
                handoffs = [(n, handoff(eng, store, n, repeats)) for n in handoff_lengths]
            gateway = asyncio.run(gateway_rows(svc, vocab, prompt512, tokens * 2, repeats))
        if rows:
            print("\n| measure | in-process | gRPC services | ratio |\n|---|---|---|---|")
        for name, a, b, ratio in rows:
            print(f"| {name} | {a:,.2f} | {b:,.2f} | {ratio} |")
        if handoffs:
            print("\n| hand-off (ms) | bytes | memcpy | write + map + load | ratio | without its 3 RPCs | ratio "
                  "| write | lease+map+verify | load into slot | release (off path) | one RPC |\n" + "|---" * 12 + "|")
        for n, h in handoffs:
            ms = {k: v * 1e3 for k, v in h.items() if k != "bytes"}
            plane = ms["total"] - 3 * ms["rpc"]
            print(f"| {n} tokens | {h['bytes'] / 2**20:.1f} MiB | {ms['memcpy']:.3f} | {ms['total']:.3f} | "
                  f"{ms['total'] / ms['memcpy']:.2f}x | {plane:.3f} | {plane / ms['memcpy']:.2f}x | "
                  f"{ms['write']:.3f} | {ms['map']:.3f} | {ms['load']:.3f} | {ms['release']:.3f} | {ms['rpc']:.3f} |")
        print("\n| gateway | direct client | gateway gRPC | gateway HTTP | gRPC vs direct | HTTP vs direct |\n" +
              "|---" * 6 + "|")
        for name, direct, grpc_, http in gateway:
            if name.startswith("time"):
                ratios = f"{grpc_ - direct:+.1f} ms | {http - direct:+.1f} ms"
            else:
                ratios = f"{grpc_ / direct:.1%} | {http / direct:.1%}"
            print(f"| {name} | {direct:,.2f} | {grpc_:,.2f} | {http:,.2f} | {ratios} |")
        print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
