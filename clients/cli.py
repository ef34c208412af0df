"""Serving commands of the `qwenpd` CLI: `serve cache|prefill|decode|all`, `demo`, and `generate --prefill/--decode`.

Heavy modules (torch, the services) are imported inside the commands, so `qwenpd --help` stays instant.
Every `serve` command takes `--ready-file PATH`: once the server is SERVING it writes {"address", "pid"} there
(atomically), so a parent that asked for port 0 learns the bound port.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    from qwenpd.cache_store import config as cache_config
    from qwenpd.decode_service import config as decode_config
    from qwenpd.prefill_service import config as prefill_config

    serve = sub.add_parser("serve", help="run the cache store, prefill or decode service, or all three")
    kinds = serve.add_subparsers(dest="service", required=True)

    p = kinds.add_parser("cache", help="the checkpoint cache store (shm or Mooncake Store data plane)")
    cache_config.add_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_cache)

    p = kinds.add_parser("prefill", help="the prefill service")
    prefill_config.add_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_prefill)

    p = kinds.add_parser("decode", help="the decode service")
    decode_config.add_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_decode)

    p = kinds.add_parser("all", help="cache store + prefill + decode as child processes on one host")
    add_serve_all_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_all)

    p = sub.add_parser("demo", help="start everything on the embedded tiny model and stream a few prompts")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny model, made if missing)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per service")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_demo)


def add_serve_all_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address all three listen on (default 127.0.0.1)")
    p.add_argument("--cache-port", type=int, default=0, help="0 = any free port (default)")
    p.add_argument("--prefill-port", type=int, default=0)
    p.add_argument("--decode-port", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    for role in ("prefill", "decode"):
        p.add_argument(f"--{role}-device", default="cpu", help=f"torch device of {role} (default cpu)")
        p.add_argument(f"--{role}-cores", default=None, metavar="LIST", help=f"NeuronCores of {role}, e.g. 0-3")
    p.add_argument("--kv-cache-bytes", default=None, metavar="BYTES",
                   help="paged KV cache of prefill and of decode, e.g. 4GiB (default: grows on demand)")
    p.add_argument("--compile", action="store_true", help="prefill and decode compile their graphs at start")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of each of prefill and decode")
    p.add_argument("--budget", default="4GiB", help="cache store shared-memory budget (default 4GiB)")
    p.add_argument("--store-id", default="default", help="cache store id (segment name prefix)")
    p.add_argument("--backend", choices=("shm", "mooncake"), default="shm",
                   help="cache store data plane; mooncake starts a local mooncake_master unless --mooncake-master")
    p.add_argument("--mooncake-master", default="", metavar="HOST:PORT", help="an existing mooncake_master")
    p.add_argument("--metadata", "--mooncake-metadata", default="", dest="mooncake_metadata", metavar="URL",
                   help="its metadata server URL (with --mooncake-master)")
    p.add_argument("--prefill-max-queue", type=int, default=64, help="prefill requests that may wait (default 64)")
    p.add_argument("--decode-max-queue", type=int, default=256,
                   help="decode sequences that may wait for a slot (default 256)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics of the cache store on this port, "
                   "prefill on +1, decode on +2 (default 0 = off)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for all three to serve")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls may finish on stop")
    from qwenpd.prefill_service.config import add_prefix_args
    from qwenpd import limits, security

    add_prefix_args(p)
    limits.add_args(p)
    security.add_args(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", default=None, help="write {\"address\", \"pid\"} here once serving")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _ready(role: str, ready_file: str | None, extra: dict | None = None):
    def on_ready(server) -> None:
        write_ready_file(ready_file, {"address": server.address, "pid": os.getpid(), **(extra or {})})
        print(f"qwenpd {role} serving on {server.address}", flush=True)

    return on_ready


def write_ready_file(path: str | None, payload: dict) -> None:
    if path is None:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(payload))
    os.replace(tmp, path)


# ---- serve -----------------------------------------------------------------------------------------------------
def cmd_serve_cache(args: argparse.Namespace) -> int:
    import asyncio

    from qwenpd.cache_store.config import config_from_args
    from qwenpd.cache_store.server import run

    from qwenpd.grpc_common import QwenpdError

    _logging(args)
    try:
        config = config_from_args(args)
        asyncio.run(run(config, _ready("cache store", args.ready_file, {"store_id": config.store_id})))
    except (ValueError, QwenpdError) as exc:  # bad flags, mooncake missing or unreachable: one clear line
        print(f"qwenpd serve cache: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0


def cmd_serve_prefill(args: argparse.Namespace) -> int:
    from qwenpd.engine.device import set_neuron_cores
    from qwenpd.prefill_service.config import config_from_args
    from qwenpd.prefill_service.server import serve

    _logging(args)
    config = config_from_args(args)
    set_neuron_cores(config.neuron_cores)  # before anything starts the Neuron runtime in this process
    return serve(config, _ready("prefill", args.ready_file))


def cmd_serve_decode(args: argparse.Namespace) -> int:
    from qwenpd.engine.device import set_neuron_cores
    from qwenpd.decode_service.config import config_from_args
    from qwenpd.decode_service.server import serve

    _logging(args)
    config = config_from_args(args)
    set_neuron_cores(config.neuron_cores)
    return serve(config, _ready("decode", args.ready_file))


def cmd_serve_all(args: argparse.Namespace) -> int:
    from qwenpd.clients.supervisor import ServiceSet, wait_for_signal

    _logging(args)
    with ServiceSet.from_args(args) as services:
        print(f"qwenpd serve all: cache store {services.cache}, prefill {services.prefill}, decode {services.decode}"
              " (Ctrl-C stops all three)", flush=True)
        write_ready_file(args.ready_file, {"cache": services.cache, "prefill": services.prefill,
                                           "decode": services.decode, "pid": os.getpid(),
                                           "children": services.pids()})
        return wait_for_signal(services)


# ---- generate through the services -----------------------------------------------------------------------------
def generate_remote(args: argparse.Namespace) -> int:
    from qwenpd.clients.client import Client

    if not (args.prefill and args.decode):
        raise SystemExit("qwenpd generate: give both --prefill ADDR and --decode ADDR")
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("qwenpd generate: give --prompt TEXT or --prompt-ids 1,2,3")
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=list(args.stop), ignore_eos=args.ignore_eos, cache_salt=args.cache_salt)
    prompt = dict(prompt=args.prompt) if args.prompt is not None else dict(token_ids=args.prompt_ids)
    started = time.perf_counter()
    from qwenpd.security import from_args as security_from_args

    with Client(prefill=args.prefill, decode=args.decode, timeout=args.timeout,
                security=security_from_args(args)) as client:
        if not args.json:
            for chunk in client.stream(**prompt, **options):
                print(chunk.text, end="", flush=True)
            print()
            return 0
        r = client.generate(**prompt, **options)
    print(json.dumps({
        "token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens, "prefill_s": r.prefill_s, "decode_s": r.decode_s,
        "wall_s": time.perf_counter() - started, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
        "cached_tokens": r.cached_tokens,
    }))
    return 0


# ---- demo ------------------------------------------------------------------------------------------------------
DEMO_PROMPTS = ("The quick brown fox", "Once upon a time there was a small model", "The quick brown fox")


def cmd_demo(args: argparse.Namespace) -> int:
    from qwenpd.clients.client import Client
    from qwenpd.clients.supervisor import ServiceSet

    model = Path(args.model) if args.model else default_tiny_model()
    print(f"qwenpd demo: model {model}; starting cache store, prefill and decode ...", flush=True)
    # a store id of its own: demos running side by side must not share (or clean up) each other's segments
    services = ServiceSet(model=str(model), store_id=f"demo{os.getpid()}", threads=args.threads, log_level="WARNING")
    with services, Client(prefill=services.prefill, decode=services.decode, timeout=args.timeout) as client:
        print(f"  cache store {services.cache}  prefill {services.prefill}  decode {services.decode}", flush=True)
        warm = client.generate("warm up", max_tokens=2, temperature=0)
        print(f"  warm-up request: first token after {1e3 * warm.ttft_s:.0f} ms (connections, the store's first "
              "shared-memory segment)\n", flush=True)
        for i, prompt in enumerate(DEMO_PROMPTS, 1):
            print(f"[{i}] {prompt!r} ->", end=" ", flush=True)
            t0 = time.perf_counter()
            first = last = None
            n = 0
            for chunk in client.stream(prompt, max_tokens=args.max_tokens, temperature=0, ignore_eos=True):
                now = time.perf_counter()
                first = first or now
                last = now
                n += len(chunk.token_ids)
                print(chunk.text, end="", flush=True)
            assert first is not None and last is not None
            tpot = (last - first) / max(1, n - 1)
            print(f"\n    {n} tokens  TTFT {1e3 * (first - t0):.1f} ms  TPOT {1e3 * tpot:.2f} ms  "
                  f"{n / (last - t0):.0f} tokens/s", flush=True)
        print("\nstopping services ...", flush=True)
    print("qwenpd demo: done", flush=True)
    return 0


def default_tiny_model() -> Path:
    """The embedded tiny model in the user's cache directory, made by init-model on first use."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenpd" / "tiny-seed0"
    if not (root / "config.json").is_file():
        from qwenpd.engine.init_model import init_model

        print(f"qwenpd demo: writing the tiny model to {root}", flush=True)
        init_model(root, "tiny", seed=0)
    return root
