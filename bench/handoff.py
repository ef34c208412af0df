"""Hand-off cost through the cache store's data planes (shm, mooncake), against one memcpy of the same bytes.

    python bench/handoff.py [--sizes 1,16,128] [--repeat 10] [--threads N] [--no-store]
    python bench/handoff.py --shapes tiny-2k,small-2k,27b-4k --backends shm,mooncake --repeat 5
    python bench/handoff.py --tp 1,2,4 --shapes 27b-4k,27b-32k --repeat 5

Table 1 (data plane): write = plan + copy tensors into a mapped segment range with checksums + header;
read = parse + verify checksums + zero-copy tensor views; ratio = (write + read) / memcpy, where memcpy is one
single-threaded memmove of the same bytes into an already-faulted buffer. Steady state: segments stay mapped
across hand-offs, as the services keep them.
Table 2 (through a live store process, per backend): put = AllocateSegment + write + CommitCheckpoint
(+ DeleteCheckpoint); get = AcquireLease + read + ReleaseLease, over loopback gRPC. For mooncake (a local
mooncake_master, TCP on loopback) the same run also measures Mooncake's own put_from/get_into of the same bytes
from/into warm registered buffers ("raw"; each object read once, like a hand-off): our overhead is the gap.
--shapes: states of the real shapes (synthetic values): <preset>-<tokens>, preset tiny|small|27b (Qwen3.6-27B).
--tp: the hand-off between tensor-parallel engines (Table 3), with Qwen3.6-27B's state shapes cut to one layer
group (3 DeltaNet + 1 attention layer; `init-model --num-layers 4`) and small matmul weights (hidden 256, vocab
1024: weights take no part in a hand-off, and 8 GB of them would not let the bench run here). put = every rank
stages its slices, each writes them into the store's shared-memory range itself, rank 0 hashes and commits;
get = lease + verify + scatter each rank its slices into its KV pages and DeltaNet state + release. Bytes per
rank come from the sharding plan (what it writes / reads).

Paper estimate, trn2 over EFA (mooncake-transfer-engine-efa-non-cuda): a trn2.48xlarge has 16 EFAv3 NICs of
200 Gb/s (3.2 Tb/s, AWS's trn2 instance page). Assuming one NIC per hand-off at ~80% of line rate (~20 GB/s):
Qwen3.6-27B at 4K tokens (403 MiB) ~21 ms, at 32K (2.2 GiB) ~115 ms, plus the device->host DMA on each side;
striped over 4 NICs, ~4x less. On loopback TCP here Mooncake moves ~1.4 GB/s (27b-4k: ~300 ms).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.cache_store.checkpoint import (CheckpointMeta, CheckpointWriter, default_threads,  # noqa: E402
                                           read_checkpoint)
from qwenpd.engine import state_spec  # noqa: E402


def make_state(mib: int) -> dict[str, torch.Tensor]:
    """About `mib` MiB shaped like a hybrid state: half fp32 recurrent [H, 128, 128], half bf16 K/V [4, T, 128]."""
    g = torch.Generator().manual_seed(0)
    half = (mib << 20) // 2
    heads = max(1, min(16, half // (128 * 128 * 4)))
    rec_bytes = heads * 128 * 128 * 4
    tokens = max(1, half // 2 // (4 * 128 * 2))
    tensors = {state_spec.tensor_name(i, "recurrent"): torch.randn(heads, 128, 128, generator=g)
               for i in range(max(1, half // rec_bytes))}
    for kind in state_spec.KV_KINDS:
        tensors[state_spec.tensor_name(99, kind)] = torch.randn(4, tokens, 128, generator=g).bfloat16()
    return tensors


def model_state(shape: str) -> dict[str, torch.Tensor]:
    """The hand-off state of `<preset>-<tokens>` (e.g. 27b-4k): K/V bf16 per attention layer, DeltaNet conv
    state bf16 and recurrent state fp32 per linear layer, with the preset's real shapes; random values."""
    from qwenpd.engine.config import preset

    name, _, toks = shape.rpartition("-")
    c = preset({"27b": "qwen3.6-27b"}.get(name, name))
    return state_of(c, int(toks[:-1]) * 1024 if toks.endswith("k") else int(toks))


def state_of(c, t: int) -> dict[str, torch.Tensor]:
    """The state tensors of model config `c` after `t` tokens, bf16 model dtype (random values)."""
    dtypes = state_spec.dtypes(c, torch.bfloat16)
    return {name: torch.empty(shape, dtype=dtypes[name]).uniform_()
            for name, shape in state_spec.shapes(c, t).items()}


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: faults pages in, fills caches of Python objects
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def data_plane_row(tensors: dict[str, torch.Tensor], repeat: int, threads: int) -> tuple[float, ...]:
    meta = CheckpointMeta("bench-fingerprint", 1234, {"qwenpd.handoff": "{}"})
    nbytes = CheckpointWriter(tensors, meta).nbytes
    path = f"/dev/shm/qwenpd-bench-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        rw = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        ro = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(path)
    src = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors.values()])
    dst = torch.zeros_like(src)
    copy_ms = median_ms(lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel()), repeat)
    write_ms = median_ms(lambda: CheckpointWriter(tensors, meta, threads).write_into(rw), repeat)
    read_ms = median_ms(lambda: read_checkpoint(ro, meta.fingerprint, threads=threads), repeat)
    out, _ = read_checkpoint(ro, meta.fingerprint)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    del out
    rw.close()
    ro.close()
    return nbytes / 2**20, copy_ms, write_ms, read_ms, (write_ms + read_ms) / copy_ms


def store_rows(states: dict[str, dict[str, torch.Tensor]], repeat: int, threads: int,
               backend: str) -> list[tuple]:
    from qwenpd.cache_store.client import CacheStoreClient

    biggest = max(CheckpointWriter(t, CheckpointMeta("x", 1)).nbytes for t in states.values()) >> 20
    budget = (repeat + 3) * (biggest + 1) + 64
    master = None
    flags = ["--segment-size", f"{budget}MiB"]
    if backend == "mooncake":
        from qwenpd.cache_store.mooncake_master import MooncakeMaster
        master = MooncakeMaster().start()
        flags = ["--backend", "mooncake", "--mooncake-master", master.address, "--metadata", master.metadata_url]
    proc = subprocess.Popen([sys.executable, "-m", "qwenpd.cache_store", "--listen", "127.0.0.1:0", "--store-id",
                             f"bench{os.getpid()}", "--budget", f"{budget}MiB", *flags],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        address = re.search(r"serving on (\S+)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
        rows = []
        with CacheStoreClient(address, io_threads=threads) as client:
            for label, tensors in states.items():
                meta = CheckpointMeta("bench-fingerprint", 1234)
                nbytes = CheckpointWriter(tensors, meta).nbytes
                put_ms = median_ms(lambda: client.delete(client.put_checkpoint(tensors, meta)), repeat)
                ids = [client.put_checkpoint(tensors, meta) for _ in range(repeat + 1)]

                def get() -> None:
                    with client.checkpoint(ids.pop(), meta.fingerprint, delete=True):
                        pass

                get_ms = median_ms(get, repeat)
                raw = raw_mooncake_ms(master, nbytes, repeat) if master else (float("nan"), float("nan"))
                rows.append((label, nbytes, put_ms, get_ms, *raw))
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if master is not None:
            master.close()


def raw_mooncake_ms(master, nbytes: int, repeat: int) -> tuple[float, float]:
    """Mooncake Store's own put_from / get_into of `nbytes` from / into warm registered buffers."""
    import numpy as np

    from qwenpd.cache_store.mooncake import connect

    mc = connect(master.address, master.metadata_url)
    src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    for buf in (src, dst):
        mc.register_buffer(buf.ctypes.data, nbytes)
    keys = iter(f"bench/raw/{i}" for i in range(10 * repeat + 10))
    done: list[str] = []

    def put() -> None:
        key = next(keys)
        assert mc.put_from(key, src.ctypes.data, nbytes) == 0
        done.append(key)

    put_ms = median_ms(put, repeat)
    fresh = iter(list(done))  # each object read once, as hand-offs do (a key's first get costs more)
    get_ms = median_ms(lambda: mc.get_into(next(fresh), dst.ctypes.data, nbytes), repeat)
    mc.remove_by_regex("^bench/raw/", True)
    mc.close()
    return put_ms, get_ms


def tp_rows(shapes: list[str], degrees: list[int], repeat: int, threads: int) -> list[tuple]:
    """Hand-off put/get between tensor-parallel engines of the 27B's state shapes (module docstring)."""
    import tempfile

    from qwenpd.cache_store.client import CacheStoreClient
    from qwenpd.engine import Engine
    from qwenpd.engine.config import preset
    from qwenpd.engine.init_model import init_model
    from qwenpd.engine.tp.plan import ShardPlan

    config = preset("qwen3.6-27b").with_num_layers(4).replace(hidden_size=256, intermediate_size=256,
                                                               vocab_size=1024, max_position_embeddings=65536)
    states = {s: state_of(config, int(s.rpartition("-")[2].rstrip("k")) * 1024) for s in shapes}
    biggest = max(CheckpointWriter(t, CheckpointMeta("x", 1)).nbytes for t in states.values()) >> 20
    budget = (repeat + 3) * (biggest + 1) + 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = init_model(Path(tmp) / "q27-state", config)
        proc = subprocess.Popen([sys.executable, "-m", "qwenpd.cache_store", "--listen", "127.0.0.1:0", "--store-id",
                                 f"benchtp{os.getpid()}", "--budget", f"{budget}MiB", "--segment-size", f"{budget}MiB"],
                                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        try:
            address = re.search(r"serving on (\S+)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
            with CacheStoreClient(address, io_threads=threads) as client:
                for tp in degrees:
                    eng = Engine(model, tp=tp, threads=max(1, (os.cpu_count() or 1) // tp))
                    try:
                        for label, canonical in states.items():
                            rows.append((label, tp, *_tp_row(eng, client, canonical, repeat),
                                         *_rank_bytes(ShardPlan(eng.config, tp, 0), canonical, tp)))
                    finally:
                        eng.close()
                        torch.set_num_threads(1)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return rows


def _tp_row(eng, client, canonical: dict[str, torch.Tensor], repeat: int) -> tuple[int, float, float]:
    n = next(t.shape[1] for name, t in canonical.items() if state_spec.kind_of(name).per_token)  # tokens
    meta = CheckpointMeta(eng.fingerprint, n)
    state = eng.state_from_tensors(canonical, n)

    def put() -> str:
        return client.put_checkpoint(state.handoff_tensors(0, for_write=True), meta)

    with client.checkpoint(put(), eng.fingerprint, delete=True) as lease:  # exact, whoever wrote which slice
        assert all(torch.equal(lease.tensors[k], v) for k, v in canonical.items())
    nbytes = CheckpointWriter(canonical, meta).nbytes
    put_ms = median_ms(lambda: client.delete(put()), repeat)
    ids = [put() for _ in range(repeat + 1)]

    def get() -> None:
        with client.checkpoint(ids.pop(), eng.fingerprint, delete=True) as lease:
            eng.state_from_tensors(dict(lease.tensors), n, locations=lease.locations).release()

    get_ms = median_ms(get, repeat)
    state.release()
    return nbytes, put_ms, get_ms


def _rank_bytes(plan, canonical: dict[str, torch.Tensor], tp: int) -> tuple[int, int]:
    """(most bytes one rank writes, most bytes one rank reads) of `canonical` under `tp` ranks."""
    from qwenpd.engine.tp.plan import ShardPlan

    def row_bytes(t: torch.Tensor) -> int:
        return t[0].numel() * t.element_size()

    writes, reads = [], []
    for rank in range(tp):
        p = ShardPlan(plan.config, tp, rank)
        writes.append(sum((stop - start) * row_bytes(t) for name, t in canonical.items()
                          for (_, start, stop), _ in p.write_ranges(name)))
        reads.append(sum((stop - start) * row_bytes(t) for name, t in canonical.items()
                         for _, start, stop in p.state_ranges(name)))
    return max(writes), max(reads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,128", help="hybrid-like states of these MiB (default 1,16,128)")
    parser.add_argument("--shapes", default="", help="real-shape states instead, e.g. tiny-2k,small-2k,27b-4k,27b-32k")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=default_threads(), help="checkpoint I/O threads")
    parser.add_argument("--backends", default="shm", help="live-store backends to measure: shm,mooncake")
    parser.add_argument("--no-store", action="store_true", help="skip the live-store table")
    parser.add_argument("--tp", default="", help="tensor-parallel hand-off table only, at these degrees (e.g. 1,2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tp:
        shapes = (args.shapes or "27b-4k,27b-32k").split(",")
        print(f"cpus={os.cpu_count()} io_threads={args.threads} repeat={args.repeat} (medians); Qwen3.6-27B state "
              "shapes, 4 layers (1 attention + 3 DeltaNet), bf16 KV/conv + fp32 recurrent, shared memory")
        rows = tp_rows(shapes, [int(d) for d in args.tp.split(",")], args.repeat, args.threads)
        print("| state | TP | checkpoint MiB | most per rank: write / read MiB | put ms | get ms | put / TP 1 | "
              "get / TP 1 |")
        print("|---|---|---|---|---|---|---|---|")
        base = {label: (put, get) for label, tp, _, put, get, *_ in rows if tp == 1}
        for label, tp, nbytes, put_ms, get_ms, w, r in rows:
            b = base.get(label)
            ratio = (lambda x, y: f"{x / y:.2f}x") if b else (lambda x, y: "")  # noqa: E731
            print(f"| {label} | {tp} | {nbytes / 2**20:.1f} | {w / 2**20:.1f} / {r / 2**20:.1f} | {put_ms:.1f} | "
                  f"{get_ms:.1f} | {ratio(put_ms, b[0]) if b else ''} | {ratio(get_ms, b[1]) if b else ''} |")
        return 0
    if args.shapes:
        states = {s: model_state(s) for s in args.shapes.split(",")}
    else:
        states = {f"{m}MiB": make_state(int(m)) for m in args.sizes.split(",")}
    print(f"cpus={os.cpu_count()} io_threads={args.threads} repeat={args.repeat} (medians)")
    print(f"{'state':>10} {'MiB':>8} {'memcpy ms':>10} {'write ms':>9} {'read ms':>8} {'ratio':>6}")
    memcpy = {}
    for label, tensors in states.items():
        size, copy_ms, write_ms, read_ms, ratio = data_plane_row(tensors, args.repeat, args.threads)
        memcpy[label] = copy_ms
        print(f"{label:>10} {size:8.1f} {copy_ms:10.2f} {write_ms:9.2f} {read_ms:8.2f} {ratio:6.2f}")
    if args.no_store:
        return 0
    print("\nthrough a live cache store (loopback gRPC); MB/s = checkpoint bytes / median time")
    print(f"{'backend':>8} {'state':>10} {'MiB':>8} {'put MB/s':>9} {'get MB/s':>9} {'raw put':>8} {'raw get':>8} "
          f"{'memcpy':>8}")
    for backend in args.backends.split(","):
        for label, nbytes, put_ms, get_ms, raw_put, raw_get in store_rows(states, args.repeat, args.threads, backend):
            rate = lambda ms: nbytes / 1e3 / ms  # noqa: E731  (MB/s)
            print(f"{backend:>8} {label:>10} {nbytes / 2**20:8.1f} {rate(put_ms):9.0f} {rate(get_ms):9.0f} "
                  f"{rate(raw_put):8.0f} {rate(raw_get):8.0f} {rate(memcpy[label]):8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
