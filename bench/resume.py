"""What an exact crash resume costs: the time to resume a stream after `kill -9` of its decode service, at 100 /
1,000 / 4,000 tokens generated, with and without decode-side checkpoints, and what the checkpoints cost a
running decode.

    python bench/resume.py [--preset tiny] [--dtype float32] [--generated 100,1000,4000] [--every 256]
                           [--speculative K]

Real processes on 127.0.0.1: a cache store, a prefill service and two decode services (each started with
--decode-checkpoint-every 0, then N). A `Client` streams one request (seeded sampling, ignore_eos) from decode A;
after `generated` tokens the bench kills A with SIGKILL and the client resumes on decode B. "resume" is the wall
time from the kill to the first new token: noticing the broken stream, the resume prefill (restore of the
resume point, or the prompt recomputed) and decode B replaying every token after that point, one decode step
each. Beside it, the undisturbed time per output token of the same stream (the replay's unit cost) and the
replayed tokens decode B counted (its /metrics). Every resumed stream is checked to be identical to the
undisturbed one.

With `--speculative K`, table 1 gains the same resume on services started with --num-speculative-tokens K (no
decode-side checkpoints): a replaying stream feeds K+1 of its tokens a verify pass instead of one a step.

Table 2: decode throughput of 8 concurrent streams of 512 tokens with checkpoints every N tokens, against none
(ratio; median of 3 runs after a warm-up run), the mean time to copy a state out on the stepping thread (the
batch waits for it: qwenpd_decode_checkpoint_copy_seconds) and to store it (off the stepping thread:
qwenpd_decode_checkpoint_write_seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.clients import Client  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402

from machine import cpu_description  # noqa: E402 - bench/machine.py

PROMPT = "A long story about a resumed stream"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Cache store + prefill + decode A and B, decode-side checkpoints every `every` tokens."""

    def __init__(self, model: Path, tmp: Path, dtype: str, every: int, threads: int, speculative: int = 0):
        self.model, self.tmp, self.dtype, self.every, self.threads = model, tmp, dtype, every, threads
        self.speculative = speculative  # --num-speculative-tokens of prefill and decode
        self.cache = f"127.0.0.1:{_free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.addr: dict[str, str] = {}
        self.metrics: dict[str, int] = {}
        self.store_id = f"bres{os.getpid()}{every}s{speculative}"

    def start(self, *names: str) -> None:
        ready = {}
        for name in names:
            ready[name] = self.tmp / f"{name}-{time.monotonic_ns()}.json"
            if name == "cache":
                args = ["serve", "cache", "--listen", self.cache, "--store-id", self.store_id]
            else:
                self.metrics[name] = _free_port()
                args = ["serve", name.rstrip("AB"), "--model", str(self.model), "--cache", self.cache,
                        "--dtype", self.dtype, "--threads", str(self.threads), "--metrics-port",
                        str(self.metrics[name])]
                if name.startswith("decode"):
                    args += ["--decode-checkpoint-every", str(self.every)]
                if self.speculative:
                    args += ["--num-speculative-tokens", str(self.speculative)]
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "qwenpd.cli", *args, "--ready-file",
                                                 str(ready[name]), "--log-level", "ERROR"])
        for name in names:
            deadline = time.monotonic() + 300
            while not ready[name].exists():
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.05)
            self.addr[name] = json.loads(ready[name].read_text())["address"]

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "cache"):
            proc = self.procs.pop(name)
            proc.terminate()
            proc.wait(30)

    def scrape(self, name: str, metric: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[name]}/metrics", timeout=10).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(metric + " "))


def _options(generated: int, seed: int) -> dict:
    return dict(max_tokens=generated + 20, ignore_eos=True, temperature=0.9, seed=seed)


def resume_row(stack: Stack, generated: int, seed: int) -> dict:
    """One stream killed after `generated` tokens on the decode it runs on, resumed on the other one."""
    with Client(prefill=stack.addr["prefill"], decode=stack.addr["decodeA"], timeout=600) as c:
        t0 = time.perf_counter()
        ref = c.generate(PROMPT, **_options(generated, seed))
        tpot = (time.perf_counter() - t0) / len(ref.token_ids)
    before = {n: stack.scrape(n, "qwenpd_decode_replayed_tokens_total") for n in ("decodeA", "decodeB")}
    ids: list[int] = []
    killed = ""
    killed_at = resumed_at = 0.0
    with Client(prefill=stack.addr["prefill"], decode=[stack.addr["decodeA"], stack.addr["decodeB"]],
                timeout=600) as c:
        for chunk in c.stream(PROMPT, **_options(generated, seed)):
            if killed and not resumed_at and chunk.token_ids:
                resumed_at = time.perf_counter()
            ids += chunk.token_ids
            if not killed and len(ids) >= generated:
                killed = _busy(stack)
                killed_at = time.perf_counter()
                stack.kill(killed)
        assert c.resumed == 1, "the stream was not resumed"
    assert ids == ref.token_ids, "the resumed stream differs from the undisturbed one"
    other = "decodeB" if killed == "decodeA" else "decodeA"
    replayed = stack.scrape(other, "qwenpd_decode_replayed_tokens_total") - before[other]
    stack.start(killed)
    return dict(generated=generated, resume_s=resumed_at - killed_at, tpot_s=tpot, replayed=int(replayed))


def _busy(stack: Stack) -> str:
    """The decode service with the stream in its batch."""
    import grpc

    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc

    for name in ("decodeA", "decodeB"):
        with grpc.insecure_channel(stack.addr[name]) as ch:
            if decode_pb2_grpc.DecodeServiceStub(ch).GetLoad(decode_pb2.GetLoadRequest(), timeout=5).active_sequences:
                return name
    raise RuntimeError("no decode service is busy")


def throughput_row(stack: Stack, streams: int = 8, tokens: int = 512, runs: int = 3) -> dict:
    """Tokens/s of `streams` concurrent streams on decode A (median of `runs` after one warm-up run), and the
    mean checkpoint store time and state-copy time there."""

    def once() -> float:
        done: list[int] = []

        def one(i: int) -> None:
            with Client(prefill=stack.addr["prefill"], decode=stack.addr["decodeA"], timeout=600) as c:
                done.append(len(c.generate(PROMPT + f" {i}", max_tokens=tokens, ignore_eos=True, temperature=0.9,
                                           seed=i).token_ids))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done) / (time.perf_counter() - t0)

    once()
    rates = sorted(once() for _ in range(runs))
    mean = {}
    for what in ("write", "copy"):
        count = stack.scrape("decodeA", f"qwenpd_decode_checkpoint_{what}_seconds_count")
        total = stack.scrape("decodeA", f"qwenpd_decode_checkpoint_{what}_seconds_sum")
        mean[what] = total / count if count else 0.0
    return dict(tokens_s=rates[len(rates) // 2], checkpoints=int(count), write_s=mean["write"], copy_s=mean["copy"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--generated", default="100,1000,4000")
    p.add_argument("--every", type=int, default=256, help="decode checkpoint interval compared with none")
    p.add_argument("--throughput-every", default="64,256", help="intervals of table 2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per service")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="also resume on services with --num-speculative-tokens K (module doc)")
    p.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True, help="table 2")
    args = p.parse_args()
    print(f"# {cpu_description()}; preset {args.preset}, {args.dtype}, {args.threads} thread(s) per service")
    with tempfile.TemporaryDirectory() as tmp:
        model = init_model(Path(tmp) / "model", args.preset, seed=0)
        rows: dict[int, list[dict]] = {}
        tput: dict[int, dict] = {}
        for every in sorted({0, args.every, *(int(x) for x in args.throughput_every.split(","))}):
            stack = Stack(model, Path(tmp), args.dtype, every, args.threads)
            stack.start("cache")
            try:
                stack.start("prefill", "decodeA", "decodeB")
                if every in (0, args.every):
                    rows[every] = [resume_row(stack, int(g), seed=i)
                                   for i, g in enumerate(args.generated.split(","))]
                if args.throughput:
                    tput[every] = throughput_row(stack)
            finally:
                stack.stop()
        spec: list[dict] = []
        if args.speculative:
            stack = Stack(model, Path(tmp), args.dtype, 0, args.threads, args.speculative)
            stack.start("cache")
            try:
                stack.start("prefill", "decodeA", "decodeB")
                spec = [resume_row(stack, int(g), seed=i) for i, g in enumerate(args.generated.split(","))]
            finally:
                stack.stop()
    print("\n## Resume after kill -9 of the decode (kill to first new token); identical output checked\n")
    print(f"| generated | TPOT undisturbed | resume, no checkpoints | replayed | resume, every {args.every} "
          f"| replayed | ratio |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(rows[0], rows[args.every]):
        print(f"| {a['generated']} | {1e3 * a['tpot_s']:.1f} ms | {a['resume_s']:.2f} s | {a['replayed']} | "
              f"{b['resume_s']:.2f} s | {b['replayed']} | {a['resume_s'] / b['resume_s']:.1f}x |")
    if spec:
        print(f"\n## The same resume with --num-speculative-tokens {args.speculative} (no checkpoints; K+1 replayed "
              "tokens a verify pass)\n")
        print("| generated | TPOT undisturbed | resume | replayed | vs without speculation |")
        print("|---|---|---|---|---|")
        for a, c in zip(rows[0], spec):
            print(f"| {c['generated']} | {1e3 * c['tpot_s']:.1f} ms | {c['resume_s']:.2f} s | {c['replayed']} | "
                  f"{a['resume_s'] / c['resume_s']:.2f}x faster |")
    if not tput:
        return
    print("\n## Decode throughput with decode-side checkpoints (8 streams x 512 tokens, median of 3 runs)\n")
    print("| checkpoint every | tokens/s | vs none | checkpoints | mean state copy (batch waits) | mean store "
          "(async) |")
    print("|---|---|---|---|---|---|")
    for every, r in sorted(tput.items()):
        print(f"| {every or 'off'} | {r['tokens_s']:.0f} | {r['tokens_s'] / tput[0]['tokens_s']:.3f} | "
              f"{r['checkpoints']} | {1e3 * r['copy_s']:.2f} ms | {1e3 * r['write_s']:.1f} ms |")


if __name__ == "__main__":
    main()
