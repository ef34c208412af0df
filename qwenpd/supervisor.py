"""`qwenpd serve all` and the demo: the cache store, prefill, decode and gateway as child processes, restarted in
place when they crash.

The supervisor holds the real config objects (CacheStoreConfig, PrefillConfig, DecodeConfig, GatewayConfig) and
hands each child its own as JSON (`qwenpd serve child --config FILE`), so no field is declared twice. Each child
writes its bound address to a ready file once it serves (port 0 works); the parent then checks grpc.health.v1
says SERVING, and pins the bound address into the config so that a restart comes back at the same address.

Supervision: a child that exits on its own is restarted in place after a backoff (0.5 s doubling to 8 s), at most
`max_restarts` times in `restart_window_s` per child; past that budget everything stops (exit 1). A child that
exits before it first serves is started again the same way, within the same budget. Every restart
is logged and counted (`qwenpd_child_restarts_total{role}` on metrics port + 4). A restarted decode takes over the
streams that the gateway and clients resume; a restarted cache store reclaims its orphaned segments.

Stopping sends SIGTERM to the gateway, then prefill and decode (they drain and release their leases), then the
cache store (which removes its shared-memory segments), and SIGKILLs whatever has not exited after the grace
period. Children also get SIGTERM if this process dies (PR_SET_PDEATHSIG, set by qwenpd.process's trampoline, never
by preexec_fn: nothing runs between fork and exec in a parent with live gRPC threads), so none outlive it; they run
in their own session, so a terminal Ctrl-C reaches only the parent, which stops them in order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenpd import limits as limits_mod
from qwenpd import security as security_mod
from qwenpd.address import format_address
from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.engine import engine_config
from qwenpd.engine.engine_config import EngineConfig
from qwenpd.process import dying_with_parent
from qwenpd.units import parse_bytes
from qwenpd.decode_service.config import DecodeConfig
from qwenpd.encoder_service.config import EncoderConfig
from qwenpd.gateway.config import DEFAULT_RESUME_WAIT_S, GatewayConfig
from qwenpd.prefill_service.config import PrefillConfig
from qwenpd.security import Security

if TYPE_CHECKING:
    from qwenpd.cache_store.mooncake_master import MooncakeMaster

log = logging.getLogger(__name__)

PLACEHOLDER = "127.0.0.1:0"  # the cache address of prefill/decode configs until the store has bound its port
LOCAL_MASTER = "local"  # mooncake_master/_metadata of a cache config: start a local mooncake_master child
CONFIG_TYPES = {cls.__name__: cls for cls in (CacheStoreConfig, PrefillConfig, DecodeConfig, GatewayConfig,
                                              EncoderConfig)}


# ---- configs as JSON, for children -------------------------------------------------------------------------------
def config_to_json(config: Any) -> str:
    return json.dumps({"type": type(config).__name__, "fields": dataclasses.asdict(config)})


def config_from_json(text: str) -> Any:
    data = json.loads(text)
    return _build(CONFIG_TYPES[data["type"]], data["fields"])


def _build(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            kw[f.name] = _build(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) else value
    return cls(**kw)


class ChildExited(RuntimeError):
    """A child exited before it served."""


# Exit codes of a child that could not start and said why (serve_main: 1, a dependency or an address; argparse and
# config checks: 2): starting it again would fail the same way. Any other exit before serving is restarted.
CANNOT_START = (1, 2)


COMPILED_RESUME_WAIT_S = 120.0  # serve all --compile: a decode restart (from its compile cache) takes this long here


def deployment_store_id(cache_port: int) -> str:
    """serve all's store id when none is given: one per deployment, so two on one host never share segments: from
    the cache store's port when it is fixed (a deployment started again on it reclaims its predecessor's
    segments), else from this process's id."""
    return f"port{cache_port}" if cache_port else f"pid{os.getpid()}"


@dataclass
class Child:
    """One supervised process, started from its config."""

    role: str
    config: Any
    tmp: Path
    log_level: str = "INFO"
    netns: str = ""  # run inside this network namespace (`ip netns exec`; tests of multi-host serving)
    proc: subprocess.Popen | None = None
    address: str = ""
    info: dict = field(default_factory=dict)  # the ready file's contents
    restarts: list[float] = field(default_factory=list)  # monotonic times of restarts

    @property
    def ready_file(self) -> Path:
        return self.tmp / f"{self.role.replace(' ', '_')}.json"

    def start(self) -> None:
        config_file = self.tmp / f"{self.role.replace(' ', '_')}.config.json"
        config_file.write_text(config_to_json(self.config))
        self.ready_file.unlink(missing_ok=True)
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        argv = [*wrap, sys.executable, "-m", "qwenpd.cli", "serve", "child", "--config", str(config_file),
                "--ready-file", str(self.ready_file), "--log-level", self.log_level]
        self.proc = subprocess.Popen(dying_with_parent(argv, signal.SIGTERM), start_new_session=True)

    def wait_ready(self, deadline: float) -> str:
        assert self.proc is not None
        said = time.monotonic()
        while not self.ready_file.exists():
            code = self.proc.poll()
            if code is not None:
                raise ChildExited(f"{self.role} exited with code {code} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} did not start serving in time")
            if time.monotonic() - said > 15:  # a compiled service warms up for minutes: say what is awaited
                said = time.monotonic()
                log.warning("waiting for %s (pid %d) to serve (%.0f s left)", self.role, self.proc.pid,
                            deadline - said)
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())
        self.address = self.info["address"]
        self.config = dataclasses.replace(self.config, listen=self.address)  # a restart comes back here
        if self.info.get("http"):
            self.config = dataclasses.replace(self.config, http_listen=self.info["http"])
        return self.address

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


@dataclass
class ServiceSet:
    """Start with `with ServiceSet.build(model=...) as s:`; addresses in s.cache / s.prefill / s.decode (and
    s.gateway / s.http when a gateway runs). Holds the services' own config objects."""

    cache_config: CacheStoreConfig
    prefill_config: PrefillConfig
    decode_config: DecodeConfig
    gateway_config: GatewayConfig | None = None  # None = no gateway
    start_timeout_s: float = 120.0
    log_level: str = "INFO"
    prefill_netns: str = ""
    decode_netns: str = ""
    max_restarts: int = 5  # per child within restart_window_s; past it, serve all stops everything
    restart_window_s: float = 300.0
    metrics_port: int = 0  # the supervisor's own /metrics (restart counts); 0 = off
    encoders: int = 0  # encoder instances (the vision tower, E/P/D): the gateway encodes image prompts there
    children: list[Child] = field(default_factory=list)
    master: "MooncakeMaster | None" = None
    _tmp: tempfile.TemporaryDirectory | None = None
    _metrics: Any = None

    @classmethod
    def build(cls, model: str, host: str = "127.0.0.1", *, gateway: bool = False, budget: str | int = "4GiB",
              prefill_host: str = "", decode_host: str = "", **overrides: Any) -> "ServiceSet":
        """Configs for one host: every override names a field of one or more of the configs (or of ServiceSet)
        and is applied to each that has it, e.g. threads= (prefill and decode), max_batch= (decode),
        store_id= (cache store), grace_s= (all); metrics_port=N gives the five processes N .. N+4;
        prefill_tp= / decode_tp= set one service's tensor-parallel degree."""
        def pick(config_cls: type, **base: Any) -> Any:
            names = {f.name for f in dataclasses.fields(config_cls)}
            return config_cls(**base, **{k: v for k, v in overrides.items() if k in names and k not in base})

        per_role = {role: {"tp": overrides.pop(f"{role}_tp")} for role in ("prefill", "decode")
                    if f"{role}_tp" in overrides}
        own = {f.name for f in dataclasses.fields(cls)}
        known = own | set(engine_config.FIELDS) | {f.name for c in CONFIG_TYPES.values() for f in dataclasses.fields(c)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"ServiceSet.build: unknown options {unknown}")
        budget_bytes = parse_bytes(budget) if isinstance(budget, str) else budget
        if overrides.get("backend") == "mooncake" and not overrides.get("mooncake_master"):
            overrides.update(mooncake_master=LOCAL_MASTER, mooncake_metadata=LOCAL_MASTER)
        metrics = overrides.pop("metrics_port", 0)  # cache store, prefill, decode, gateway, supervisor: +0..+4
        port = (lambda offset: metrics + offset if metrics else 0)  # noqa: E731
        cache = pick(CacheStoreConfig, listen=format_address(host, 0), budget_bytes=budget_bytes,
                     metrics_port=port(0))
        def engine(role: str) -> EngineConfig:
            given = {k: v for k, v in overrides.items() if k in engine_config.FIELDS}
            return EngineConfig(model_dir=str(model), **{**given, **per_role.get(role, {})})

        prefill = pick(PrefillConfig, engine=engine("prefill"), cache=PLACEHOLDER,
                       listen=format_address(prefill_host or host, 0), metrics_port=port(1))
        decode = pick(DecodeConfig, engine=engine("decode"), cache=PLACEHOLDER,
                      listen=format_address(decode_host or host, 0), metrics_port=port(2))
        gw = pick(GatewayConfig, prefill=(PLACEHOLDER,), decode=(PLACEHOLDER,), listen=format_address(host, 0),
                  http_listen=format_address(host, 0), metrics_port=port(3)) if gateway else None
        return cls(cache, prefill, decode, gw, metrics_port=port(4),
                   **{k: v for k, v in overrides.items() if k in own})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServiceSet":
        """The configs `qwenpd serve all` flags describe (add_serve_all_args in qwenpd.serve)."""
        sec = security_mod.from_args(args)
        limits = limits_mod.from_args(args)
        metrics = args.metrics_port

        def port(offset: int) -> int:
            return metrics + offset if metrics else 0

        common = dict(grace_s=args.grace, limits=limits, security=sec)
        local = args.backend == "mooncake" and not args.mooncake_master
        cache = CacheStoreConfig(listen=format_address(args.host, args.cache_port), budget_bytes=args.budget,
                                 store_id=args.store_id or deployment_store_id(args.cache_port), grace_s=args.grace,
                                 security=sec, metrics_port=port(0),
                                 backend=args.backend, mooncake_master=LOCAL_MASTER if local else args.mooncake_master,
                                 mooncake_metadata=LOCAL_MASTER if local else args.mooncake_metadata)
        prefill = PrefillConfig(engine=engine_config.from_args(args, args.model, "prefill"), cache=PLACEHOLDER,
                                listen=format_address(args.host, args.prefill_port), chunk_size=args.chunk_size,
                                max_queue=args.prefill_max_queue, block_size=args.block_size,
                                snapshot_interval=args.snapshot_interval, prefix_cache=args.prefix_cache,
                                metrics_port=port(1), num_speculative_tokens=args.num_speculative_tokens,
                                **common)
        decode = DecodeConfig(engine=engine_config.from_args(args, args.model, "decode"), cache=PLACEHOLDER,
                              listen=format_address(args.host, args.decode_port), max_batch=args.max_batch,
                              checkpoint_every=args.decode_checkpoint_every,
                              num_speculative_tokens=args.num_speculative_tokens,
                              speculative_max_batch=args.speculative_max_batch,
                              speculative_policy=args.speculative_policy,
                              max_queue=args.decode_max_queue, metrics_port=port(2), **common)
        gateway = None if args.no_gateway else GatewayConfig(
            prefill=(PLACEHOLDER,), decode=(PLACEHOLDER,), listen=format_address(args.host, args.gateway_port),
            http_listen=format_address(args.host, args.http_port), grace_s=args.grace, security=sec,
            max_message_bytes=limits.max_message_bytes, metrics_port=port(3),
            resume_wait_s=args.resume_wait_s or (COMPILED_RESUME_WAIT_S if decode.engine.compile else
                                                  DEFAULT_RESUME_WAIT_S),
            served_model_names=tuple(args.served_model_names), cors_origins=tuple(args.cors_origins),
            default_chat_template_kwargs=args.default_chat_template_kwargs,
            allowed_media_domains=tuple(args.allowed_media_domains),
            allowed_local_media_path=args.allowed_local_media_path)
        if args.encoders < 0:
            raise ValueError(f"--encoders must be >= 0, got {args.encoders}")
        if args.encoders:
            from qwenpd.engine.config import ModelConfig

            if ModelConfig.from_pretrained(args.model).vision is None:
                raise ValueError("--encoders: this checkpoint has no vision tower (no vision_config)")
        return cls(cache, prefill, decode, gateway, start_timeout_s=args.start_timeout, log_level=args.log_level,
                   max_restarts=args.max_restarts, metrics_port=port(4), encoders=args.encoders)

    # ---- addresses -----------------------------------------------------------------------------------------------
    def _child(self, role: str) -> Child:
        return next(c for c in self.children if c.role == role)

    @property
    def cache(self) -> str:
        return self._child("cache store").address

    @property
    def prefill(self) -> str:
        return self._child("prefill").address

    @property
    def decode(self) -> str:
        return self._child("decode").address

    @property
    def gateway(self) -> str:
        return self._child("gateway").address

    @property
    def http(self) -> str:
        return self._child("gateway").info.get("http", "")

    @property
    def security(self) -> Security:
        return self.cache_config.security

    def pids(self) -> dict[str, int]:
        return {c.role: c.proc.pid for c in self.children if c.proc is not None}

    def addresses(self) -> dict[str, str]:
        out = {c.role.replace("cache store", "cache"): c.address for c in self.children}
        if self.gateway_config is not None and self.children and self.children[-1].role == "gateway":
            out["http"] = self.http
        return out

    # ---- start and stop ------------------------------------------------------------------------------------------
    def _mooncake(self) -> None:
        c = self.cache_config
        if c.backend == "mooncake" and c.mooncake_master == LOCAL_MASTER:
            from qwenpd.cache_store.mooncake_master import MooncakeMaster

            self.master = MooncakeMaster(c.host).start()
            self.cache_config = dataclasses.replace(c, mooncake_master=self.master.address,
                                                    mooncake_metadata=self.master.metadata_url)

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="qwenpd-serve-")
        tmp = Path(self._tmp.name)
        deadline = time.monotonic() + self.start_timeout_s
        self.children = []
        try:
            self._mooncake()
            cache = Child("cache store", self.cache_config, tmp, self.log_level)
            self.children = [cache]
            self._launch([cache], deadline)
            models = [Child("prefill", _with_compile_cache(self.prefill_config, cache.address, tmp / "compiled-prefill"),
                            tmp, self.log_level, self.prefill_netns),
                      Child("decode", _with_compile_cache(self.decode_config, cache.address, tmp / "compiled-decode"),
                            tmp, self.log_level, self.decode_netns)]
            self.children += models
            encoders = [Child(f"encoder {i}", self._encoder_config(cache.address, i), tmp, self.log_level)
                        for i in range(self.encoders)]
            self.children += encoders
            self._launch(models + encoders, deadline)
            if self.gateway_config is not None:
                gw = Child("gateway", dataclasses.replace(self.gateway_config, prefill=(models[0].address,),
                                                          decode=(models[1].address,),
                                                          encoders=tuple(e.address for e in encoders)),
                           tmp, self.log_level)
                self.children.append(gw)
                self._launch([gw], deadline)
            if self.metrics_port:
                self._serve_metrics()
        except BaseException:
            self.stop()
            raise

    def _encoder_config(self, cache: str, i: int) -> EncoderConfig:
        """Encoder instance i beside prefill: its checkpoint, dtype, device, threads, limits and security; metrics
        on the supervisor's port + 1 + i when the supervisor has one."""
        p = self.prefill_config
        return EncoderConfig(model_dir=p.model_dir, cache=cache, listen=format_address(
            p.listen.rsplit(":", 1)[0].strip("[]"), 0), dtype=p.engine.dtype, device=p.engine.device,
            threads=p.engine.threads, grace_s=p.grace_s, limits=p.limits, security=p.security,
            metrics_port=self.metrics_port + 1 + i if self.metrics_port else 0)

    def _launch(self, children: list[Child], deadline: float) -> None:
        for child in children:
            child.start()
        self._await_serving(children, deadline)

    def _await_serving(self, children: list[Child], deadline: float) -> None:
        """Wait until each child serves; one that exits first is started again like one that exits later
        (backoff, within its restart budget), so a child dying in start-up stops nothing by itself."""
        for child in children:
            while True:
                try:
                    child.wait_ready(deadline)
                    break
                except ChildExited:
                    if child.proc.returncode in CANNOT_START or not self._start_again(child):
                        raise
                    deadline = max(deadline, time.monotonic() + self.start_timeout_s)
            wait_serving(child.address, deadline, self.security)

    def _serve_metrics(self) -> None:
        from prometheus_client import Counter

        from qwenpd.metrics import Metrics

        self._metrics = Metrics("supervisor")
        self._metrics.restarts = Counter("qwenpd_child_restarts", "children restarted in place after they exited",
                                         ["role"], registry=self._metrics.registry)
        self._metrics.serve(self.cache_config.host, self.metrics_port)

    def failed(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.exited()), None)

    def restart(self, child: Child) -> bool:
        """Restart an exited child in place after a backoff; False when its restart budget is spent."""
        if not self._start_again(child):
            return False
        self._await_serving([child], time.monotonic() + self.start_timeout_s)
        log.warning("%s is back at %s", child.role, child.address)
        return True

    def _start_again(self, child: Child) -> bool:
        """Start an exited child again after a backoff if its restart budget allows; False when it is spent."""
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < self.restart_window_s]
        if len(child.restarts) >= self.max_restarts:
            return False
        delay = min(8.0, 0.5 * 2 ** len(child.restarts))
        code = child.proc.returncode if child.proc is not None else None
        log.warning("%s exited with code %s; restarting it at %s in %.1f s (restart %d of %d in %.0f s)",
                    child.role, code, child.address or "a new address", delay, len(child.restarts) + 1,
                    self.max_restarts, self.restart_window_s)
        time.sleep(delay)
        child.restarts.append(time.monotonic())
        if self._metrics is not None:
            self._metrics.restarts.labels(child.role).inc()
        child.start()
        return True

    def stop(self) -> dict[str, int]:
        """Stop the gateway, decode and prefill, then the cache store; return each child's exit code."""
        codes: dict[str, int] = {}
        grace = max(c.config.grace_s for c in self.children) if self.children else 0.0
        for group in ([c for c in self.children if c.role == "gateway"],
                      [c for c in self.children if c.role in ("prefill", "decode") or c.role.startswith("encoder")],
                      [c for c in self.children if c.role == "cache store"]):
            live = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for c in live:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace + 10.0  # drain, then at most this long to exit
            for c in group:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
                codes[c.role] = c.proc.returncode
        if self.master is not None:  # after the cache store: it removes its objects through the master
            self.master.close()
            self.master = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return codes

    def __enter__(self) -> "ServiceSet":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_serving(address: str, deadline: float, security: Security | None = None) -> None:
    """Poll grpc.health.v1 Check("") until SERVING (over TLS when `security` has a CA)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with security_mod.channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report SERVING in time")
            time.sleep(0.05)


def wait_for_signal(services: ServiceSet, restart: bool = True,
                    on_restart: typing.Callable[[], None] = lambda: None) -> int:
    """Block until SIGINT/SIGTERM (exit 0), restarting children that exit on their own; exit 1 when a child's
    restart budget is spent (or, with restart=False, at the first child that exits)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.2):
            dead = services.failed()
            if dead is None:
                continue
            try:
                if restart and services.restart(dead):
                    on_restart()
                    continue
            except (RuntimeError, TimeoutError) as exc:
                print(f"qwenpd serve all: restarting {dead.role} failed: {exc}", file=sys.stderr, flush=True)
            code = dead.proc.returncode if dead.proc is not None else None
            print(f"qwenpd serve all: {dead.role} exited with code {code} and will not be restarted; stopping "
                  "the others", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _with_compile_cache(config: Any, cache: str, default_dir: Path) -> Any:
    """A model service's config pointed at the cache store; compiled without a --compile-cache, it gets one for
    this run, so a child restarted after a crash reuses its graphs instead of compiling again (a compiled TP 2
    decode restarted in ~28 s cold here, longer than a resuming client waits for a decode)."""
    changes: dict[str, Any] = {"cache": cache}
    if config.engine.compile and config.engine.compile_cache is None:
        changes["engine"] = config.engine.replace(compile_cache=str(default_dir))
    return dataclasses.replace(config, **changes)

