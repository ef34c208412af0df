"""`qwenpd check-device --device D`: the first thing an operator runs on a new host (GPU, trn2, or CPU).

1. Accuracy: on generated checkpoints (init-model presets), the engine on D in fp32 against the CPU fp32 engine:
   max-abs logit error of a prefill and greedy tokens of a short decode (must be equal). On CUDA with
   flash-linear-attention installed, also FLA against the torch ops (tf32 inside: a logit tolerance under
   teacher forcing).
2. Compile: the bf16 engine on D compiled over a few buckets (one prefill chunk, decode b1/b8/b32); warm-up
   time, and the compiled logits against eager on the same device.
3. Speed: prefill of a long prompt and decode steps at batch 1, 8, 32 (tokens/s, ms/step).
Everything goes into one table on stdout; the exit code is 1 if an accuracy check failed.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenpd.engine.pages import pages_for
from qwenpd.engine.device import resolve_device, synchronize
from qwenpd.engine.engine import DecodeBatch, Engine
from qwenpd.engine.init_model import init_model
from qwenpd.engine.runner import Buckets

FP32_ATOL = 2e-3  # logits of std ~1: fp32 on another device differs only by summation order
FLA_RTOL = 2e-2  # FLA's Triton kernels compute in tf32 (10-bit mantissa) inside
FLA_KERNEL_ATOL = 5e-2  # random unit-scale inputs, a 100-token chunk (measured on an H200: 8e-4)


@dataclass
class Row:
    check: str
    model: str
    dtype: str
    result: str
    ok: bool = True


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(engine: Engine, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    logits, state = engine.prefill(prompt, chunk_size=128)
    batch = DecodeBatch(engine, 1)
    batch.add(state)
    tokens = [int(logits.argmax())]
    for _ in range(steps - 1):
        tokens.append(int(batch.step([tokens[-1]])[0].argmax()))
    return logits.float().cpu(), tokens


def accuracy(model_dir: Path, name: str, device: str, steps: int = 16) -> Row:
    """The torch ops on `device` against the CPU: same math, only summation order differs."""
    ref = Engine(model_dir, dtype="float32", deltanet_kernels="torch")
    dev = Engine(model_dir, dtype="float32", device=device, deltanet_kernels="torch")
    prompt = _ids(300, ref.config.vocab_size, seed=1)
    ref_logits, ref_tokens = _greedy(ref, prompt, steps)
    logits, tokens = _greedy(dev, prompt, steps)
    err = (logits - ref_logits).abs().max().item()
    equal = sum(a == b for a, b in zip(tokens, ref_tokens))
    ok = err <= FP32_ATOL and tokens == ref_tokens
    return Row("fp32 vs cpu", name, "fp32", f"max|dlogit| {err:.1e}, greedy {equal}/{steps} equal "
               f"[{dev.kernel_family}]", ok)


def _forced(engine: Engine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits of the prefill and of each decode step fed `tokens` (teacher forcing), [1 + len(tokens), V] fp32."""
    logits, state = engine.prefill(prompt, chunk_size=128)
    batch = DecodeBatch(engine, 1)
    batch.add(state)
    out = [logits.float().cpu()]
    for t in tokens:
        out.append(batch.step([t])[0].float().cpu())
    return torch.stack(out)


def fla_accuracy(model_dir: Path, name: str, device: str, steps: int = 16) -> Row:
    """deltanet_kernels="fla" (FLA's chunked kernel for prefill) against the torch ops, both on `device`: FLA runs
    tf32 inside, so the check is a tolerance on logits fed the same tokens (teacher forcing), not equal greedy
    tokens. FLA's own recurrent step is measured too and reported: the engine does not use it."""
    from qwenpd.kernels import fla

    ref = Engine(model_dir, dtype="float32", device=device, deltanet_kernels="torch")
    dev = Engine(model_dir, dtype="float32", device=device, deltanet_kernels="fla")
    prompt = _ids(300, ref.config.vocab_size, seed=1)
    tokens = _ids(steps, ref.config.vocab_size, seed=3)
    a, b = _forced(ref, prompt, tokens), _forced(dev, prompt, tokens)
    err, scale = (a - b).abs().max().item(), a.abs().max().item()
    chunk_err, step_err = fla.check_equal(device)
    ok = err <= FLA_RTOL * max(1.0, scale) and chunk_err <= FLA_KERNEL_ATOL
    return Row("fla vs torch ops", name, "fp32", f"max|dlogit| {err:.1e} over prefill + {steps} forced steps "
               f"(|logit| <= {scale:.1f}); FLA chunk kernel {chunk_err:.1e}, FLA recurrent step (unused) "
               f"{step_err:.1e}", ok)


def _decode_rate(engine: Engine, tensors: dict, n: int, batch_size: int, steps: int, device) -> float:
    """Seconds per decode step at `batch_size` (states copied from one prefilled prompt)."""
    batch = DecodeBatch(engine, batch_size)
    states = [engine.state_from_tensors(tensors, n, extra_tokens=steps + 2) for _ in range(batch_size)]
    for s in states:
        batch.add(s)
    batch.step([1] * batch_size)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        batch.step([2 + i] * batch_size)
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def speed(model_dir: Path, name: str, device: str, compile_: bool, prompt_len: int, batches: tuple[int, ...],
          steps: int, kv_bytes: int | float, kernels: str = "torch") -> list[Row]:
    eng = Engine(model_dir, dtype="bfloat16", device=device, kv_cache_bytes=kv_bytes, deltanet_kernels=kernels)
    dev, chunk = eng.device, 512
    rows = []
    prompt = _ids(prompt_len, eng.config.vocab_size, seed=2)
    eager_logits = eng.prefill(prompt[:chunk], chunk_size=chunk)[0].float().cpu() if compile_ else None
    if compile_:
        width = pages_for(prompt_len + steps + 4, eng.kv_cache.page_size)
        buckets = Buckets(chunks=(chunk,), batches=batches, widths=(width,))
        warm = eng.compile(buckets, max_batch=batches[-1])
        logits = eng.prefill(prompt[:chunk], chunk_size=chunk)[0].float().cpu()
        err = (logits - eager_logits).abs().max().item()
        ok = err <= 0.1 * max(1.0, eager_logits.abs().max().item())
        rows.append(Row("compile", name, "bf16", f"{buckets.count()} graphs in {warm:.1f} s; compiled vs eager "
                        f"max|dlogit| {err:.2e}", ok))
    mode = "compiled" if compile_ else "eager"
    eng.prefill(prompt[:chunk], chunk_size=chunk)  # warm caches and allocators
    synchronize(dev)
    t0 = time.perf_counter()
    _, state = eng.prefill(prompt, chunk_size=chunk)
    synchronize(dev)
    took = time.perf_counter() - t0
    rows.append(Row(f"prefill {prompt_len} ({mode})", name, "bf16", f"{took:.3f} s, {prompt_len / took:,.0f} tok/s "
                    f"[{eng.kernel_family}]"))
    tensors, n = state.to_tensors(), state.num_tokens
    del state
    for b in batches:
        per_step = _decode_rate(eng, tensors, n, b, steps, dev)
        rows.append(Row(f"decode b{b} ({mode})", name, "bf16",
                        f"{1e3 * per_step:.2f} ms/step, {b / per_step:,.0f} tok/s (context {n})"))
    return rows


def print_table(rows: list[Row], device: str) -> None:
    widths = [max(len(f), *(len(getattr(r, f)) for r in rows)) for f in ("check", "model", "dtype")]
    print(f"qwenpd check-device --device {device}  (torch {torch.__version__})")
    print(f"{'check':<{widths[0]}}  {'model':<{widths[1]}}  {'dtype':<{widths[2]}}  ok    result")
    for r in rows:
        print(f"{r.check:<{widths[0]}}  {r.model:<{widths[1]}}  {r.dtype:<{widths[2]}}  "
              f"{'yes' if r.ok else 'FAIL':<4}  {r.result}", flush=True)


def check_device(device: str, presets: tuple[str, ...] = ("tiny", "small"), speed_preset: str = "small",
                 compile_: bool = True, prompt_len: int = 2048, batches: tuple[int, ...] = (1, 8, 32),
                 steps: int = 16, kv_bytes: int | float = 1 << 30) -> int:
    resolve_device(device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="qwenpd-check-") as tmp:
        dirs = {p: init_model(Path(tmp) / p, p, seed=0) for p in {*presets, speed_preset}}
        for p in presets:
            rows.append(accuracy(dirs[p], p, device))
        if resolve_device(device).type == "cuda":
            from qwenpd.kernels import fla

            if fla.available():
                rows += [fla_accuracy(dirs[p], p, device) for p in presets]
        rows += speed(dirs[speed_preset], speed_preset, device, compile_, prompt_len, batches, steps, kv_bytes)
    print_table(rows, device)
    return 0 if all(r.ok for r in rows) else 1
