"""Serving commands of the `qwenpd` CLI: `serve cache|prefill|decode|all`, `demo`, and `generate --prefill/--decode`.

Heavy modules (torch, the services) are imported inside the commands, so `qwenpd --help` stays instant.
Every `serve` command takes `--ready-file PATH`: once the server is SERVING it writes {"address", "pid"} there
(atomically), so a parent that asked for port 0 learns the bound port.
"""

from __future__ import annotations

import argparse
import importlib
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

    p = kinds.add_parser("encoder", help="an encoder instance: a multimodal checkpoint's vision tower, its output "
                         "handed to prefill through the cache store (the gateway's --encoder pool)")
    from qwenpd.encoder_service import config as encoder_config

    encoder_config.add_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_encoder)

    p = kinds.add_parser("gateway", help="the gateway: gRPC Generate and the OpenAI-compatible HTTP API over pools "
                         "of prefill and decode instances")
    from qwenpd.gateway import config as gateway_config

    gateway_config.add_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_gateway)

    p = kinds.add_parser("child", help="(internal) a service started from its config, as `serve all` does")
    p.add_argument("--config", required=True, help="JSON file written by the supervisor")
    _add_common(p)
    p.set_defaults(func=cmd_serve_child)

    p = kinds.add_parser("all", help="cache store + prefill + decode + gateway as child processes on one host, "
                         "restarted in place when they crash")
    add_serve_all_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve_all)

    p = sub.add_parser("demo", help="start everything on the embedded tiny model and stream a few prompts")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny model, made if missing)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per demo answer (default 24)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per service")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds each demo call may take (default 120)")
    p.set_defaults(func=cmd_demo)


def add_serve_all_args(p: argparse.ArgumentParser) -> None:
    """Flags of `serve all`; every default comes from the config it lands in."""
    from qwenpd import limits, security, service_config
    from qwenpd.cache_store.config import CacheStoreConfig
    from qwenpd.engine import engine_config
    from qwenpd.units import parse_bytes
    from qwenpd.decode_service.config import DecodeConfig, add_checkpoint_every, add_speculative_policy
    from qwenpd.model_service import add_speculative_args
    from qwenpd.gateway.config import DEFAULT_RESUME_WAIT_S, add_http_args
    from qwenpd.prefill_service.config import PrefillConfig, add_prefix_args
    from qwenpd.supervisor import ServiceSet

    cache, prefill = service_config.field_defaults(CacheStoreConfig), service_config.field_defaults(PrefillConfig)
    decode, sup = service_config.field_defaults(DecodeConfig), service_config.field_defaults(ServiceSet)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address all of them listen on (default 127.0.0.1)")
    p.add_argument("--cache-port", type=int, default=0, help="0 = any free port (default)")
    p.add_argument("--prefill-port", type=int, default=0, help="the prefill service's port (0 = any free port)")
    p.add_argument("--decode-port", type=int, default=0, help="the decode service's port (0 = any free port)")
    p.add_argument("--gateway-port", type=int, default=0, help="the gateway's gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=0, help="the gateway's OpenAI-compatible HTTP port")
    p.add_argument("--no-gateway", action="store_true", help="do not start the gateway")
    p.add_argument("--resume-wait", type=float, default=None, dest="resume_wait_s", metavar="S",
                   help="seconds the gateway holds a broken decode stream while no decode instance answers, e.g. "
                   f"during a restart (default {DEFAULT_RESUME_WAIT_S:g}; with "
                   "--compile 120, long enough for a decode service to restart from its compile cache)")
    p.add_argument("--encoders", type=int, default=0, metavar="N",
                   help="N encoder instances (qwenpd serve encoder: a multimodal checkpoint's vision tower) the "
                        "gateway encodes image prompts on, their output reaching prefill through the cache store "
                        "(default 0: prefill runs the tower)")
    p.add_argument("--max-restarts", type=int, default=sup.max_restarts, help="restarts of one crashed child "
                   f"within 5 minutes before serve all gives up (default {sup.max_restarts})")
    engine_config.add_args(p, roles=("prefill", "decode"))  # the services' engine flags, per role where they differ
    p.add_argument("--chunk-size", type=int, default=prefill.chunk_size,
                   help=f"prompt tokens per prefill chunk (default {prefill.chunk_size})")
    p.add_argument("--max-batch", type=int, default=decode.max_batch,
                   help=f"sequences decode steps together (default {decode.max_batch})")
    add_checkpoint_every(p, decode.checkpoint_every, "decode_checkpoint_every")
    add_speculative_args(p)
    add_speculative_policy(p, decode)
    p.add_argument("--budget", type=parse_bytes, default=cache.budget_bytes,
                   help=f"cache store shared-memory budget (default {cache.budget_bytes >> 30}GiB)")
    p.add_argument("--store-id", default=None, help="cache store id (the prefix of its shared-memory segments; a "
                   "store started again with the same id removes the segments its predecessor left) (default: one "
                   "per deployment, from --cache-port when given, else from this process's id)")
    p.add_argument("--backend", choices=("shm", "mooncake"), default=cache.backend,
                   help="cache store data plane; mooncake starts a local mooncake_master unless --mooncake-master")
    p.add_argument("--mooncake-master", default="", metavar="HOST:PORT", help="an existing mooncake_master")
    p.add_argument("--metadata", "--mooncake-metadata", default="", dest="mooncake_metadata", metavar="URL",
                   help="its metadata server URL (with --mooncake-master)")
    p.add_argument("--prefill-max-queue", type=int, default=prefill.max_queue,
                   help=f"prefill requests that may wait (default {prefill.max_queue})")
    p.add_argument("--decode-max-queue", type=int, default=decode.max_queue,
                   help=f"decode sequences that may wait for a slot (default {decode.max_queue})")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics of the cache store on this port, "
                   "prefill on +1, decode on +2, gateway on +3, the supervisor's restart counts on +4 (0 = off)")
    p.add_argument("--start-timeout", type=float, default=sup.start_timeout_s,
                   help=f"seconds to wait for all of them to serve (default {sup.start_timeout_s:g})")
    p.add_argument("--grace", type=float, default=prefill.grace_s, help="seconds in-flight calls may finish on stop")
    add_prefix_args(p)
    add_http_args(p)
    limits.add_args(p)
    security.add_args(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", default=None, help="write {\"address\", \"pid\"} here once serving")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log lines of this level and above, on stderr (default INFO)")


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


# ---- serve -----------------------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace, config_from_args, serve) -> int:
    """One service in this process: bad flags exit 2 with one line; the server's own exits otherwise
    (qwenpd.grpc_server.serve_main), as `python -m qwenpd.cache_store` does."""
    _logging(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"qwenpd serve {args.service}: {exc}", file=sys.stderr)
        return 2
    return serve(config, args.ready_file)


def cmd_serve_cache(args: argparse.Namespace) -> int:
    from qwenpd.cache_store import config, server

    return _serve(args, config.config_from_args, server.serve)


def cmd_serve_prefill(args: argparse.Namespace) -> int:
    from qwenpd.prefill_service import config, server

    return _serve(args, config.config_from_args, server.serve)


def cmd_serve_decode(args: argparse.Namespace) -> int:
    from qwenpd.decode_service import config, server

    return _serve(args, config.config_from_args, server.serve)


def cmd_serve_encoder(args: argparse.Namespace) -> int:
    from qwenpd.encoder_service import config, server

    return _serve(args, config.config_from_args, server.serve)


def cmd_serve_gateway(args: argparse.Namespace) -> int:
    from qwenpd.gateway import config, server

    return _serve(args, config.config_from_args, server.serve)


def cmd_serve_child(args: argparse.Namespace) -> int:
    """A service from the config the supervisor wrote (qwenpd.supervisor.config_to_json)."""
    from qwenpd.supervisor import config_from_json

    _logging(args)
    config = config_from_json(Path(args.config).read_text())
    package = type(config).__module__.rsplit(".", 1)[0]  # qwenpd.<service>.config -> qwenpd.<service>.server
    return importlib.import_module(f"{package}.server").serve(config, args.ready_file)


def cmd_serve_all(args: argparse.Namespace) -> int:
    from qwenpd import grpc_server
    from qwenpd.supervisor import ChildExited, ServiceSet, wait_for_signal

    _logging(args)
    services = ServiceSet.from_args(args)
    try:
        try:
            services.start()
        except (ChildExited, TimeoutError) as exc:  # the child said why on stderr: one more line, no traceback
            print(f"qwenpd serve all: {exc}", file=sys.stderr)
            return 1
        addresses = services.addresses()
        print("qwenpd serve all: " + ", ".join(f"{role} {addr}" for role, addr in addresses.items()) +
              " (Ctrl-C stops them all)", flush=True)

        def ready() -> None:  # again after each restart: the children's pids change
            grpc_server.write_ready_file(args.ready_file,
                                         {**addresses, "pid": os.getpid(), "children": services.pids()})

        ready()
        return wait_for_signal(services, on_restart=ready)
    finally:
        services.stop()


# ---- generate through the services -----------------------------------------------------------------------------
def generate_remote(args: argparse.Namespace) -> int:
    from qwenpd.clients.client import Client

    if not (args.prefill and args.decode):
        raise SystemExit("qwenpd generate: give both --prefill ADDR and --decode ADDR")
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("qwenpd generate: give --prompt TEXT or --prompt-ids 1,2,3")
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=list(args.stop), ignore_eos=args.ignore_eos, cache_salt=args.cache_salt)
    from qwenpd.cli import _with_placeholders

    prompt = (dict(prompt=_with_placeholders(args.prompt, args.image)) if args.prompt is not None
              else dict(token_ids=args.prompt_ids))
    if args.image:
        prompt["images"] = [Path(p).read_bytes() for p in args.image]
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
        "cached_tokens": r.cached_tokens, "image_tokens": r.image_tokens,
    }))
    return 0


# ---- demo ------------------------------------------------------------------------------------------------------
DEMO_PROMPTS = ("The quick brown fox", "Once upon a time there was a small model", "The quick brown fox")


def cmd_demo(args: argparse.Namespace) -> int:
    import grpc

    from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc
    from qwenpd.supervisor import ServiceSet

    model = Path(args.model) if args.model else default_tiny_model()
    print(f"qwenpd demo: model {model}; starting cache store, prefill, decode and gateway ...", flush=True)
    # a store id of its own: demos running side by side must not share (or clean up) each other's segments
    services = ServiceSet.build(str(model), gateway=True, store_id=f"demo{os.getpid()}", threads=args.threads,
                                log_level="WARNING")
    with services, grpc.insecure_channel(services.gateway) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        print(f"  cache store {services.cache}  prefill {services.prefill}  decode {services.decode}\n"
              f"  gateway: gRPC {services.gateway}, OpenAI-compatible HTTP http://{services.http}/v1", flush=True)

        def run(prompt: str, max_tokens: int, show: bool) -> tuple[int, float, generate_pb2.GenerateChunk]:
            request = generate_pb2.GenerateRequest(text=prompt, sampling=common_pb2.SamplingParams(
                temperature=0, max_tokens=max_tokens, ignore_eos=True))
            started = time.perf_counter()
            first = None
            n = 0
            for chunk in stub.Generate(request, timeout=args.timeout):
                first = first or time.perf_counter()
                n += len(chunk.token_ids)
                if show:
                    print(chunk.text, end="", flush=True)
            assert first is not None
            return n, first - started, chunk

        _, ttft, _ = run("warm up", 2, show=False)
        print(f"  warm-up request: first token after {1e3 * ttft:.0f} ms (connections, the store's first "
              "shared-memory segment)\n", flush=True)
        for i, prompt in enumerate(DEMO_PROMPTS, 1):
            print(f"[{i}] {prompt!r} ->", end=" ", flush=True)
            n, ttft, last = run(prompt, args.max_tokens, show=True)
            t = last.timings
            print(f"\n    {n} tokens  TTFT {1e3 * ttft:.1f} ms (gateway: {t.ttft_ns / 1e6:.1f} ms)  "
                  f"TPOT {t.tpot_ns / 1e6:.2f} ms  cached {last.usage.cached_tokens} prompt tokens", flush=True)
        _demo_tool_call(stub, args.timeout)
        print("\n  time to first token: call start to the first chunk here (gateway: arrival to prefill's answer);\n"
              "  time per output token: (last token - first token) / (tokens - 1), timed at the gateway per token,\n"
              "  not per chunk, so tokens that share a chunk do not shrink it.", flush=True)
        print("\nstopping services ...", flush=True)
    print("qwenpd demo: done", flush=True)
    return 0


DEMO_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "maxLength": 16},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                   "required": ["city", "days"]}}}]


def _demo_tool_call(stub, timeout: float) -> None:
    """A chat that must call a tool (tool_choice "required": constrained decoding, so even the random-weight tiny
    model makes a valid call), streamed as the gateway parses it."""
    import json

    from qwenpd.clients.chat_request import tool_choice_spec
    from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, prefill_pb2

    offered, forced = tool_choice_spec(DEMO_TOOLS, "required", parallel=False)
    chat = prefill_pb2.Chat(messages=[common_pb2.ChatMessage(role="user", content="Weather in Oslo for 3 days?")],
                            tools_json=json.dumps(offered), enable_thinking=False)
    request = generate_pb2.GenerateRequest(chat=chat, sampling=common_pb2.SamplingParams(
        temperature=0, max_tokens=256, structured_output=forced))
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stub.Generate(request, timeout=timeout):
        for d in chunk.tool_calls:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.name
            call["arguments"] += d.arguments
        if chunk.HasField("finish_reason"):
            finish = common_pb2.FinishReason.Name(chunk.finish_reason)
    print(f"[{len(DEMO_PROMPTS) + 1}] a chat offering get_weather with tool_choice \"required\" ->", flush=True)
    for i, call in sorted(calls.items()):
        print(f"    tool call {i}: {call['name']}({call['arguments']})", flush=True)
    print(f"    finish: {finish}", flush=True)


def default_tiny_model() -> Path:
    """The embedded tiny model in the user's cache directory, made by init-model on first use."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenpd" / "tiny-seed0"
    if not (root / "config.json").is_file():
        from qwenpd.engine.init_model import init_model

        print(f"qwenpd demo: writing the tiny model to {root}", flush=True)
        init_model(root, "tiny", seed=0)
    return root
