"""Two commits side by side on this machine: `qwenpd generate --json` of each, runs alternating, one table.

    python bench/commits.py --baseline-commit e04b42f [--commit HEAD] [--preset small] [--dtype bfloat16]
                            [--runs 3] [--prompts 128,512,2048] [--decode-tokens 64] [--compile]

Each commit is checked out (git worktree) and installed without its dependencies into a virtual environment of
its own that sees this interpreter's packages (kept under --cache-dir, so a second run reuses it); leave
--commit out to measure the working tree as it is, uncommitted changes included. Every figure is a process of its
own: load the checkpoint, prefill one prompt, decode `--decode-tokens` tokens greedily, report `prefill_s` and
`decode_s` (so a first request's one-time costs show, as they do for a user). Runs alternate between the two
sides, so drift on a shared machine hits both; the table gives the median and range of each and after/before.
The `generate` command line is the interface both commits share, which is why this goes through it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from machine import cpu_description  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def install(rev: str | None, cache: Path) -> tuple[Path, str]:
    """A python whose `qwenpd` is commit `rev` (None: the working tree as it is); returns it and a label."""
    if rev is None:  # a copy: building in place would leave build/ behind in the checkout
        label, source, key = "working tree", cache / "src-worktree", "worktree"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                    ".hypothesis", ".pytest_cache", "runs"))
    else:
        sha = run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"])
        label, source, key = f"{rev} ({sha[:9]})", cache / f"src-{sha[:12]}", sha[:12]
        if not source.exists():
            run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(source), sha])
    env_dir = cache / f"venv-{key}"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.create(env_dir, system_site_packages=True, with_pip=True)  # torch etc. from this interpreter
    if rev is None or not (env_dir / ".installed").exists():  # a wheel built here, installed there
        wheels = cache / f"wheel-{key}"
        shutil.rmtree(wheels, ignore_errors=True)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
             str(source)], cwd=cache)
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
             *map(str, wheels.glob("qwenpd-*.whl"))], cwd=cache)
        (env_dir / ".installed").touch()
    return python, label


def generate(python: Path, model: Path, prompt_len: int, args, cwd: Path) -> dict:
    ids = ",".join(str(1 + i % 1000) for i in range(prompt_len))
    cmd = [str(python), "-m", "qwenpd.cli", "generate", "--model", str(model), "--prompt-ids", ids, "--json",
           "--max-tokens", str(args.decode_tokens), "--temperature", "0", "--ignore-eos", "--dtype", args.dtype,
           "--chunk-size", "2048"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.compile:
        cmd += ["--compile", "--kv-cache-bytes", "256MiB"]
    return json.loads(run(cmd, cwd=cwd).splitlines()[-1])  # cwd outside any checkout: no folder shadows anything


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-commit", required=True, help="the 'before' commit")
    ap.add_argument("--commit", default=None, help="the 'after' commit (default: the working tree as it is)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--runs", type=int, default=3, help="processes per side and prompt length (default 3)")
    ap.add_argument("--prompts", default="128,512,2048", help="prompt lengths (default 128,512,2048)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded after each prompt (default 64)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="both sides --compile (warm-up excluded)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwenpd-bench-commits")
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sides = [install(args.baseline_commit, args.cache_dir), install(args.commit, args.cache_dir)]
    model = args.cache_dir / f"model-{args.preset}-{args.dtype}"
    if not (model / "config.json").exists():
        run([str(sides[1][0]), "-m", "qwenpd.cli", "init-model", "--preset", args.preset, "--dtype", args.dtype,
             "--out", str(model)], cwd=args.cache_dir)
    prompts = [int(p) for p in args.prompts.split(",")]
    got: dict[tuple[int, int], list[dict]] = {}
    for _ in range(args.runs):
        for n in prompts:
            for side, (python, _) in enumerate(sides):
                got.setdefault((side, n), []).append(generate(python, model, n, args, args.cache_dir))
    print(f"## {args.preset} {args.dtype}{' compiled' if args.compile else ' eager'}, {os.cpu_count()} CPUs: "
          f"{cpu_description()}; {args.runs} processes per cell, alternating; median (min-max)")
    print(f"before: {sides[0][1]}; after: {sides[1][1]}")
    print("| measure | before | after | after / before |")
    print("|---|---|---|---|")
    for n in prompts:
        rows = (("prefill_s", f"prefill of {n} tokens, first request of the process (s)", lambda r: r["prefill_s"]),
                ("prefill_tps", f"prefill {n} (tok/s)", lambda r: n / r["prefill_s"]),
                ("decode_tps", f"decode after {n}, batch 1 (tok/s)",
                 lambda r: (len(r["token_ids"]) - 1) / r["decode_s"]))
        for _, label, value in rows:
            before, after = ([value(r) for r in got[(side, n)]] for side in (0, 1))
            print(f"| {label} | {_cell(before)} | {_cell(after)} | "
                  f"{statistics.median(after) / statistics.median(before):.2f}x |")
    return 0


def _cell(values: list[float]) -> str:
    fmt = (lambda v: f"{v:.3f}") if max(values) < 10 else (lambda v: f"{v:,.1f}")
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


if __name__ == "__main__":
    sys.exit(main())
