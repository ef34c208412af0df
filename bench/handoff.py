"""Hand-off cost through the cache store's shared-memory data plane, against one memcpy of the same bytes.

    python bench/handoff.py [--sizes 1,16,128] [--repeat 10] [--threads N] [--no-store]

Table 1 (data plane): write = plan + copy tensors into a mapped segment range with checksums + header;
read = parse + verify checksums + zero-copy tensor views; ratio = (write + read) / memcpy, where memcpy is one
single-threaded memmove of the same bytes into an already-faulted buffer. Steady state: segments stay mapped
across hand-offs, as the services keep them.
Table 2 (through a live store process): put = AllocateSegment + write + CommitCheckpoint (+ DeleteCheckpoint);
get = AcquireLease + read + ReleaseLease, over loopback gRPC.
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

from cache_store.checkpoint import CheckpointMeta, CheckpointWriter, default_threads, read_checkpoint  # noqa: E402


def make_state(mib: int) -> dict[str, torch.Tensor]:
    """About `mib` MiB shaped like a hybrid state: half fp32 recurrent [H, 128, 128], half bf16 K/V [4, T, 128]."""
    g = torch.Generator().manual_seed(0)
    half = (mib << 20) // 2
    heads = max(1, min(16, half // (128 * 128 * 4)))
    rec_bytes = heads * 128 * 128 * 4
    tokens = max(1, half // 2 // (4 * 128 * 2))
    tensors = {f"layers.{i}.recurrent": torch.randn(heads, 128, 128, generator=g)
               for i in range(max(1, half // rec_bytes))}
    tensors["layers.99.k"] = torch.randn(4, tokens, 128, generator=g).bfloat16()
    tensors["layers.99.v"] = torch.randn(4, tokens, 128, generator=g).bfloat16()
    return tensors


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: faults pages in, fills caches of Python objects
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def data_plane_row(mib: int, repeat: int, threads: int) -> tuple[float, ...]:
    tensors = make_state(mib)
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


def store_rows(sizes: list[int], repeat: int, threads: int) -> list[tuple[float, ...]]:
    from cache_store.client import CacheStoreClient

    budget = (repeat + 3) * max(sizes) + 64
    proc = subprocess.Popen([sys.executable, "-m", "cache_store", "--listen", "127.0.0.1:0", "--store-id",
                             f"bench{os.getpid()}", "--budget", f"{budget}MiB", "--segment-size", f"{budget}MiB"],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        address = re.search(r"listening on (\S+)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
        rows = []
        with CacheStoreClient(address, io_threads=threads) as client:
            for mib in sizes:
                tensors = make_state(mib)
                meta = CheckpointMeta("bench-fingerprint", 1234)
                put_ms = median_ms(lambda: client.delete(client.put_checkpoint(tensors, meta)), repeat)
                ids = [client.put_checkpoint(tensors, meta) for _ in range(repeat + 1)]

                def get() -> None:
                    with client.checkpoint(ids.pop(), meta.fingerprint, delete=True):
                        pass

                get_ms = median_ms(get, repeat)
                rows.append((CheckpointWriter(tensors, meta).nbytes / 2**20, put_ms, get_ms))
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,128", help="state sizes in MiB (default 1,16,128)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=default_threads(), help="checkpoint I/O threads")
    parser.add_argument("--no-store", action="store_true", help="skip the live-store table")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    print(f"cpus={os.cpu_count()} io_threads={args.threads} repeat={args.repeat} (medians)")
    print(f"{'MiB':>8} {'memcpy ms':>10} {'write ms':>9} {'read ms':>8} {'ratio':>6}")
    for mib in sizes:
        size, copy_ms, write_ms, read_ms, ratio = data_plane_row(mib, args.repeat, args.threads)
        print(f"{size:8.1f} {copy_ms:10.2f} {write_ms:9.2f} {read_ms:8.2f} {ratio:6.2f}")
    if not args.no_store:
        print(f"\nthrough a live cache store (loopback gRPC)\n{'MiB':>8} {'put ms':>8} {'get ms':>8}")
        for size, put_ms, get_ms in store_rows(sizes, args.repeat, args.threads):
            print(f"{size:8.1f} {put_ms:8.2f} {get_ms:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
