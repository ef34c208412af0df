"""The `qwenpd` command line. Subcommands import their machinery lazily so `--help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _parse_kv_cache_size(text: str) -> int | float:
    from qwenpd.units import parse_kv_cache_size

    return parse_kv_cache_size(text)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probabilities add up to P (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def sampling_from_args(args: argparse.Namespace):
    from qwenpd.engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_init_model(args: argparse.Namespace) -> int:
    from qwenpd.engine.init_model import init_model

    from qwenpd.engine.config import ModelConfig

    started = time.perf_counter()
    out = init_model(args.out, args.preset, seed=args.seed, dtype=args.dtype, num_layers=args.num_layers)
    c = ModelConfig.from_pretrained(out)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {args.preset} checkpoint ({c.num_hidden_layers} layers, {c.num_parameters() / 1e9:.3g} G params, "
          f"{size / 1e9:.3g} GB {c.torch_dtype}) to {out} in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from qwenpd.engine import engine_config

    if args.prefill or args.decode:
        from qwenpd.serve import generate_remote  # through the services

        given = [f"--{f.replace('_', '-')}" for f in engine_config.FIELDS
                 if getattr(args, f) != getattr(engine_config.EngineConfig(model_dir=""), f)]
        given += ["--num-speculative-tokens"] if args.num_speculative_tokens else []
        if given or args.model:
            raise ValueError(f"{', '.join(given or ['--model'])}: engine options apply in-process; the services "
                             "were started with their own")
        return generate_remote(args)
    if not args.model:
        raise SystemExit("qwenpd generate: --model DIR is required (or --prefill ADDR --decode ADDR)")
    from qwenpd.engine.device import set_neuron_cores
    from qwenpd.engine.engine import Engine

    config = engine_config.from_args(args, args.model, speculative=args.num_speculative_tokens > 0)
    engine_config.check_draft_quantize(config)
    prompt_ids = _prompt_ids(args)
    if config.compile and args.kv_cache_bytes is None:  # exactly the pages this prompt and max_tokens need
        from qwenpd.engine.kv_cache import kv_cache_bytes_for

        tokens = len(prompt_ids) + args.max_tokens + max(0, args.num_speculative_tokens)  # the drafts' KV past it
        config = config.replace(kv_cache_bytes=kv_cache_bytes_for(config, tokens))
    set_neuron_cores(config.neuron_cores)
    if config.compile:  # one line per compiled bucket on stderr (warm-up takes a while)
        import logging

        logging.basicConfig(format="qwenpd generate: %(message)s")
        logging.getLogger("qwenpd.compile").setLevel(logging.INFO)
    engine = Engine(config)
    try:
        media = None
        if args.image:
            prompt_ids, media = _local_images(engine, prompt_ids, args.image)
        return _generate_local(engine, prompt_ids, args, media)
    finally:
        engine.close()


IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _with_placeholders(prompt: str | None, images: list[str]) -> str | None:
    """--image with a text prompt that names no place for the images: the images first, then the text."""
    if not images or prompt is None or "<|image_pad|>" in prompt:
        return prompt
    return IMAGE_PLACEHOLDER * len(images) + prompt


def _local_images(engine, prompt_ids: list[int], paths: list[str]):
    """The prompt's ids with its images placed, and their PromptMedia (ValueError: exit code 2, naming the file)."""
    from pathlib import Path

    import torch

    from qwenpd.engine.media import MediaError, ProcessorSpec, decode_image, image_pixels
    from qwenpd.engine.vision import prompt_media

    v = engine.config.vision
    if v is None:
        raise ValueError("--image: this checkpoint has no vision tower")
    spec, _ = ProcessorSpec.from_checkpoint(engine.model_dir, v.patch_size, v.temporal_patch_size,
                                            v.spatial_merge_size)
    items = []
    for path in paths:
        try:
            items.append(image_pixels(decode_image(Path(path).read_bytes()), spec))
        except (OSError, MediaError) as exc:
            raise ValueError(f"--image {path}: {exc}") from None
    embeds = [engine.encode_images(torch.from_numpy(p.values), [p.grid])[0] for p in items]
    tok = engine.tokenizer
    try:
        return prompt_media(prompt_ids, items, embeds, v, tok.encode if tok is not None else None)
    except MediaError as exc:
        raise ValueError(f"--image: {exc}") from None


def _prompt_ids(args: argparse.Namespace) -> list[int]:
    if args.prompt_ids is not None:
        return args.prompt_ids
    args.prompt = _with_placeholders(args.prompt, args.image)
    if args.prompt is None:
        raise SystemExit("qwenpd generate: give --prompt TEXT or --prompt-ids 1,2,3")
    from pathlib import Path

    from qwenpd.engine.tokenizer import Tokenizer

    if not (Path(args.model) / "tokenizer.json").is_file():
        raise SystemExit("this checkpoint has no tokenizer.json; use --prompt-ids")
    return Tokenizer(args.model).encode(args.prompt)


def _generate_local(engine, prompt_ids: list[int], args: argparse.Namespace, media=None) -> int:
    from qwenpd.engine.generate import generate

    params = sampling_from_args(args)
    started = time.perf_counter()
    warmup_s = 0.0
    config = engine.engine_config
    k = args.num_speculative_tokens
    if k < 0:
        raise ValueError(f"--num-speculative-tokens must be >= 0, got {k}")
    if k and engine.device.type != "cpu":
        raise ValueError("--num-speculative-tokens runs on CPU for now: drop --device")
    if config.compile:
        buckets = engine.default_buckets(args.chunk_size, 1, max_context=len(prompt_ids) + args.max_tokens)
        warmup_s = engine.compile(buckets, max_batch=1, cache_dir=config.compile_cache,
                                  regional=False if config.whole_graphs else None, verify=(1, k + 1) if k else (0, 0))
    on_text = None if args.json else (lambda s: print(s, end="", flush=True))
    spec = {}
    if k:
        if media is not None:
            raise ValueError("--image with --num-speculative-tokens: speculative decoding of image prompts runs in "
                             "the services only")
        result, head = _generate_speculative(engine, prompt_ids, params, args, on_text)
        spec = {"draft_tokens": result.draft_tokens, "accepted_tokens": result.accepted_tokens,
                "accepted_per_position": result.accepted_at, "draft_weight_bytes": head.weight_bytes}
    else:
        result = generate(engine, prompt_ids, params, chunk_size=args.chunk_size, on_text=on_text, media=media)
    if args.json:
        print(json.dumps({
            "token_ids": result.token_ids, "text": result.text, "finish_reason": result.finish_reason,
            "prompt_tokens": len(prompt_ids), "prefill_s": result.prefill_s, "decode_s": result.decode_s,
            "warmup_s": warmup_s, "weight_bytes": engine.weight_bytes, **spec,
            **({"int8_kernel": engine.int8_kernel} if engine.int8_kernel else {}),
            **({"delta_step_kernel": engine.delta_step_kernel} if engine.delta_step_kernel else {}),
            "wall_s": time.perf_counter() - started,
        }))
    else:
        print()
    return 0


def _generate_speculative(engine, prompt_ids: list[int], params, args: argparse.Namespace, on_text):
    """generate --num-speculative-tokens K: the checkpoint's MTP head (loaded by the engine: EngineConfig.speculative)
    drafts. Returns (the result, the head)."""
    from qwenpd.engine.generate import generate_speculative

    head = engine.draft_head
    result = generate_speculative(engine, head, prompt_ids, params, args.num_speculative_tokens,
                                  chunk_size=args.chunk_size, rollback=args.speculative_rollback, on_text=on_text)
    return result, head


def cmd_check_device(args: argparse.Namespace) -> int:
    from qwenpd.engine.check_device import check_device
    from qwenpd.engine.device import set_neuron_cores

    set_neuron_cores(args.neuron_cores)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    return check_device(args.device, tuple(args.presets.split(",")), args.speed_preset, not args.no_compile,
                        args.prompt_tokens, batches, args.steps, args.kv_cache_bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenpd", description="Disaggregated prefill/decode serving of "
                                     "Qwen3.5/3.6 hybrid models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write a checkpoint with deterministic random weights")
    p.add_argument("--preset", default="tiny", help="tiny | small | qwen3.5-2b | qwen3.6-27b (default tiny)")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="keep N layers (a multiple of 4: 3 DeltaNet + 1 attention), every other shape as the preset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="stored dtype (preset default)")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", help="generate in-process, or through the services with --prefill/--decode")
    p.add_argument("--model", help="checkpoint directory (in-process)")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids", type=_parse_ids, help="prompt token ids, comma-separated")
    add_sampling_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for the prompt (repeatable; a model with a vision tower). The prompt's "
                        "<|image_pad|> placeholders place them in order; a --prompt without any gets the images "
                        "first")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size (default 512)")
    p.add_argument("--num-speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding (in-process, eager): K drafts per step from the checkpoint's MTP head "
                        "(mtp.* weights), one verify pass of K+1 positions; the tokens are plain decoding's "
                        "(default 0: off)")
    p.add_argument("--speculative-rollback", choices=("auto", "replay", "snapshot"), default="auto",
                   help="how rejected drafts are undone in the DeltaNet state (default auto: snapshot at batch <= 2)")
    from qwenpd.engine import engine_config  # plain Python: --help stays instant

    engine_config.add_args(p)  # --compile: warmup_s in --json, excluded from prefill_s/decode_s
    p.add_argument("--cache-salt", default=None, help="prefix-cache isolation key (services only)")
    p.add_argument("--prefill", help="prefill service address (go through the services)")
    p.add_argument("--decode", help="decode service address")
    p.add_argument("--timeout", type=float, default=120.0, help="per-call timeout in seconds (services)")
    p.add_argument("--json", action="store_true", help="print one JSON line with ids, text and timings")
    from qwenpd.security import add_args as add_security_args

    add_security_args(p, server=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check-device", help="engine on DEVICE vs CPU fp32 (accuracy), compile, prefill/decode speed")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] | neuron (default cpu)")
    p.add_argument("--neuron-cores", default=None, metavar="LIST", help="NeuronCores to use, e.g. 0-3")
    p.add_argument("--presets", default="tiny,small", help="checkpoints for the accuracy check (default tiny,small)")
    p.add_argument("--speed-preset", default="small", help="checkpoint for compile and speed (default small)")
    p.add_argument("--no-compile", action="store_true", help="measure the eager engine")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="prefill length measured (default 2048)")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes measured (default 1,8,32)")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size (default 16)")
    p.add_argument("--kv-cache-bytes", type=_parse_kv_cache_size, default=1 << 30, metavar="SIZE",
                   help="bytes or a fraction of free device memory (default 1GiB)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_check_device)

    try:  # serving subcommands (serve, demo) live with the services
        from qwenpd.serve import add_service_commands
    except ImportError:
        pass
    else:
        add_service_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # configuration and input errors: one clear line, no traceback
        print(f"qwenpd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
