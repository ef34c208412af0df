"""Time to first token of an image prompt through the services, cold and warm, against a text prompt of the same
token count, in one run.

    python bench/vision.py [--runs 3] [--vision-depth 8] [--threads 2] [--model DIR]

The model: `small`'s text shapes (bf16) with a vision tower of Qwen3.5/3.6's real width (hidden 1152, 16 heads,
MLP 4304, patch 16, merge 2) cut to --vision-depth blocks (the real tower has 27: its time scales with the depth),
random weights, made by transformers (cached under /tmp). The prompt: a chat turn with one 448x448 image (196
image tokens) and a short question. Through `serve all`'s prefill and decode (Client: prefill, then one decode
step), per run with a fresh image:

  cold           a new image and new text: the tower and the whole prompt run
  encoder hit    the same image after other text of the same length: the encoder cache skips the tower, the prefix
                 cache misses from the changed text on
  prefix hit     the same prompt again: the prefix cache restores every full block (blocks of 16 tokens; one
                 DeltaNet snapshot per prompt, at its last block boundary)
  text only      token ids of the same count, new each run: the baseline, cold

TTFT is the client's clock (call to first token). "encoder" is the tower's time inside prefill
(PrefillTimings.encoder_ns). Ratios are against the text-only TTFT measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_description  # noqa: E402 - bench/machine.py

from qwenpd.clients.client import Client  # noqa: E402
from qwenpd.engine.config import preset  # noqa: E402
from qwenpd.supervisor import ServiceSet  # noqa: E402
from tests.hf_models import save_vision_checkpoint  # noqa: E402

SIDE = 448


def make_model(out: Path, depth: int) -> Path:
    if (out / "config.json").is_file():
        return out
    text = preset("small").to_hf_dict()
    for key in ("architectures", "model_type", "dtype"):
        text.pop(key)
    # small's 32 rotary dims (16 frequencies) in interleaved sections, as the 27B's 64 in (11, 11, 10)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    vision = dict(depth=depth, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=1024,
                  patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304)
    pre = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
           "size": {"shortest_edge": 65536, "longest_edge": 16777216}}
    return save_vision_checkpoint(out, seed=0, text=text, vision=vision, preprocessor=pre, dtype=torch.bfloat16)


def image(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def chat(picture: bytes, words: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": words}, {"type": "image", "image": picture},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vision-depth", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="an existing multimodal checkpoint (default: made as above)")
    args = ap.parse_args()
    model = Path(args.model) if args.model else make_model(Path(tempfile.gettempdir()) /
                                                           f"qwenpd-bench-vision-d{args.vision_depth}",
                                                           args.vision_depth)
    rows: dict[str, list[tuple[float, float, int, int]]] = {k: [] for k in ("cold", "encoder hit", "prefix hit",
                                                                            "text only")}
    with ServiceSet.build(str(model), threads=args.threads, store_id="benchvision", log_level="WARNING",
                          block_size=16, snapshot_interval=0, budget="4GiB") as services, \
            Client(prefill=services.prefill, decode=services.decode, timeout=600) as client:
        client.generate(messages=chat(image(999), "warm up"), max_tokens=2)
        vocab = 4000
        for run in range(args.runs):
            picture = image(run)
            cases = {"cold": chat(picture, f"first words {run:04d}"),
                     "encoder hit": chat(picture, f"other words {run:04d}"),
                     "prefix hit": chat(picture, f"other words {run:04d}")}
            prompt_tokens = 0
            for name, messages in cases.items():
                r = client.generate(messages=messages, max_tokens=1, temperature=0)
                rows[name].append((r.ttft_s, r.encoder_s, r.cached_tokens, r.prompt_tokens))
                prompt_tokens = r.prompt_tokens
            g = torch.Generator().manual_seed(100 + run)
            ids = torch.randint(10, vocab, (prompt_tokens,), generator=g).tolist()
            r = client.generate(token_ids=ids, max_tokens=1, temperature=0)
            rows["text only"].append((r.ttft_s, 0.0, r.cached_tokens, r.prompt_tokens))

    base = statistics.median(t for t, _, _, _ in rows["text only"])
    print(f"\n## image prompt TTFT through the services ({cpu_description()}, torch {torch.__version__}, "
          f"{args.threads} threads)")
    print(f"small text model (bf16) + vision tower 1152 wide x {args.vision_depth} blocks; one {SIDE}x{SIDE} image "
          f"= 196 image tokens; median of {args.runs} runs")
    print("| prompt | tokens | cached | TTFT | encoder | encoder share | TTFT / text-only |")
    print("|---|---|---|---|---|---|---|")
    for name, values in rows.items():
        ttft = statistics.median(v[0] for v in values)
        enc = statistics.median(v[1] for v in values)
        print(f"| {name} | {values[0][3]} | {statistics.median(v[2] for v in values):.0f} | {ttft * 1e3:.0f} ms | "
              f"{enc * 1e3:.0f} ms | {enc / ttft:.0%} | {ttft / base:.2f}x |")


if __name__ == "__main__":
    main()
