"""`serve all` started and stopped many times, in a row and several at once: any abort at start-up counts.

    python bench/startups.py [--rounds 30] [--together 4] [--model DIR]

Each deployment is a real `qwenpd serve all` (cache store, prefill, decode, gateway) on the tiny model with its own
store id, started with a ready file and stopped with SIGTERM. A deployment fails when serve all does not reach
serving or does not exit 0, when a child restarts during start-up, or when anything it printed names an abort
(SIGABRT, "epoll_wait error", "Wakeup().ok()"). Prints the counts and the start times (median, max).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ABORT_SIGNS = ("SIGABRT", "code -6", "epoll_wait error", "Wakeup().ok()", "exited with code", "Traceback")


def deployment(model: Path, tmp: Path, tag: str, timeout_s: float = 180.0) -> tuple[bool, float, str]:
    """Start one serve all, wait until it serves, stop it: (clean, seconds to serve, what went wrong)."""
    ready, log = tmp / f"{tag}.json", tmp / f"{tag}.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qwenpd.cli", "serve", "all", "--model", str(model),
                                 "--store-id", tag, "--threads", "1", "--ready-file", str(ready),
                                 "--log-level", "WARNING"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tempfile.gettempdir())
        try:
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() - started > timeout_s:
                    break
                time.sleep(0.05)
            serving = ready.exists() and bool(json.loads(ready.read_text()).get("gateway"))
            took = time.monotonic() - started
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        except BaseException:
            proc.kill()
            raise
    text = log.read_text(errors="replace")
    signs = [s for s in ABORT_SIGNS if s in text]
    clean = serving and code == 0 and not signs
    why = "" if clean else f"serving={serving} exit={code} signs={signs}: {text[-600:]}"
    return clean, took, why


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="deployments started and stopped one after another")
    ap.add_argument("--together", type=int, default=4, help="then this many started at once")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: a fresh tiny model)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenpd-startups-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None:
            model = tmp / "tiny"
            subprocess.run([sys.executable, "-m", "qwenpd.cli", "init-model", "--preset", "tiny", "--out",
                            str(model)], check=True, capture_output=True)
        results = [deployment(model, tmp, f"seq{os.getpid()}_{i}") for i in range(args.rounds)]
        with ThreadPoolExecutor(args.together) as pool:
            together = list(pool.map(lambda i: deployment(model, tmp, f"par{os.getpid()}_{i}"),
                                     range(args.together)))
    for label, rows in (("in a row", results), ("at once", together)):
        bad = [why for ok, _, why in rows if not ok]
        times = [t for _, t, _ in rows]
        print(f"| {len(rows)} deployments {label} | {len(bad)} failed | start to serving: median "
              f"{statistics.median(times):.1f} s, max {max(times):.1f} s |")
        for why in bad[:3]:
            print("   ", why.replace("\n", " | ")[:800])
    return 0 if all(ok for ok, _, _ in results + together) else 1


if __name__ == "__main__":
    sys.exit(main())
