"""bf16 accuracy: rms logit error of the bf16 engine against the fp32 engine on the same bf16-stored checkpoint,
beside transformers' bf16 against its fp32, in one run.

    python bench/accuracy.py [--preset small] [--model DIR] [--prompt 256] [--steps 16] [--batch 1]

prefill: the logits of every prompt position (one chunk; the projections see many rows). decode: `--steps`
teacher-forced steps of a batch of `--batch` copies of the prompt's continuation (few rows per projection: on a
CPU without bf16 arithmetic the two paths multiply differently, engine/linear.py). Both engines read the same bf16
weights, so the error is what computing in bf16 costs. Prints one table.

    python bench/accuracy.py --quantized [--presets small,qwen3.6-27b:4] [--prompts 4] [--prompt 128]

Quantization, measured as peers report it: for each of `--quantize` fp8, fp8-mlp and int8 against the same
checkpoint in bf16, the mean KL divergence KL(bf16 || quantized) of the next-token distributions and the top-1
agreement, over every position of `--prompts` fixed random prompts (one forward each). `name:N` cuts a preset to
N layers (the 27B's shapes, 4 layers: what fits here).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.engine import DecodeBatch, Engine  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402


def rms(a: torch.Tensor) -> float:
    return a.double().pow(2).mean().sqrt().item()


def engine_logits(eng: Engine, ids: list[int], prompt: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits of ids[:prompt] [prompt, V], decode logits of the rest, teacher-forced [steps, B, V])."""
    full = eng.forward_all(ids[:prompt])
    db = DecodeBatch(eng, batch)
    for _ in range(batch):
        _, state = eng.prefill(ids[:prompt], chunk_size=prompt)
        db.add(state)
    steps = [db.step([t] * batch).float() for t in ids[prompt:]]
    return full.float(), torch.stack(steps)


def hf_logits(path: Path, dtype: torch.dtype, ids: list[int]) -> torch.Tensor:
    from transformers import Qwen3_5ForCausalLM

    model = Qwen3_5ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def quantized_table(presets: str, prompts: int, length: int, seed: int) -> None:
    print("| model | quantize | mean KL(bf16 ‖ quantized) | top-1 agreement | positions |")
    print("|---|---|---|---|---|")
    for spec in presets.split(","):
        name, _, layers = spec.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            path = init_model(Path(tmp) / "m", name, dtype="bfloat16", num_layers=int(layers) if layers else None)
            base = Engine(path, dtype="bfloat16", warm_up=False)
            g = torch.Generator().manual_seed(seed)
            vocab = base.grammars.words if base.grammars else base.config.vocab_size
            inputs = [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(prompts)]
            ref = [torch.log_softmax(base.forward_all(ids).float(), -1) for ids in inputs]
            del base
            for mode in ("fp8", "fp8-mlp", "int8"):
                eng = Engine(path, dtype="bfloat16", quantize=mode, warm_up=False)
                kls, agree, n = [], 0, 0
                for ids, r in zip(inputs, ref):
                    q = torch.log_softmax(eng.forward_all(ids).float(), -1)
                    kls.append((r.exp() * (r - q)).sum(-1))
                    agree += int((r.argmax(-1) == q.argmax(-1)).sum())
                    n += len(ids)
                del eng
                label = f"{name} ({layers} layers)" if layers else name
                print(f"| {label} | {mode} | {torch.cat(kls).mean().item():.5f} | {agree / n:.1%} | {n} |",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantized", action="store_true", help="the quantization table instead (module doc)")
    ap.add_argument("--presets", default="small,qwen3.6-27b:4")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", help="existing bf16 checkpoint dir (default: init the preset into a temp dir)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quantized:
        quantized_table(args.presets, args.prompts, args.prompt if args.prompt != 256 else 128, args.seed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else init_model(Path(tmp) / "m", args.preset, dtype="bfloat16")
        fp32 = Engine(path, dtype="float32")
        vocab = fp32.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(10, vocab, (args.prompt + args.steps,), generator=g).tolist()
        truth_prefill, truth_decode = engine_logits(fp32, ids, args.prompt, args.batch)
        del fp32
        ours_prefill, ours_decode = engine_logits(Engine(path, dtype="bfloat16"), ids, args.prompt, args.batch)
        hf32 = hf_logits(path, torch.float32, ids)
        hf16 = hf_logits(path, torch.bfloat16, ids)
    print(f"\n{args.preset}, bf16-stored weights, prompt {args.prompt}, {args.steps} decode steps at batch "
          f"{args.batch}; rms logit error against the same code in fp32 (rms of the fp32 logits: "
          f"{rms(truth_prefill):.3f})")
    print("| measure | qwenpd bf16 vs qwenpd fp32 | transformers bf16 vs transformers fp32 | qwenpd / transformers |")
    print("|---|---|---|---|")
    p, hp = rms(ours_prefill - truth_prefill), rms(hf16[:args.prompt] - hf32[:args.prompt])
    d, hd = rms(ours_decode - truth_decode), rms(hf16[args.prompt:] - hf32[args.prompt:])
    print(f"| prefill | {p:.4f} | {hp:.4f} | {p / hp:.2f}x |")
    print(f"| decode | {d:.4f} | {hd:.4f} (its full forward) | {d / hd:.2f}x |")


if __name__ == "__main__":
    main()
