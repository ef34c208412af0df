"""Crash recovery on real processes: kill -9 of a decode service mid-stream (the client resumes elsewhere and the
output is identical to an uninterrupted run), of a prefill service (retried elsewhere or UNAVAILABLE), and of the
cache store (a restarted store reclaims the orphaned segments; stale handles are NOT_FOUND)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from qwenpd.clients import Client, NotFound, Unavailable
from tests.services.conftest import model_service_flags, pid_alive, qwenpd_cmd, segments, wait_ready_file

LONG = dict(max_tokens=400, ignore_eos=True)


class Stack:
    """Separate cache store, prefill and decode processes, so that tests can kill any of them."""

    def __init__(self, model_dir: Path, tmp: Path):
        self.model_dir, self.tmp = model_dir, tmp
        self.store_id = f"rec{os.getpid()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.addr: dict[str, str] = {}
        self.cache_listen = f"127.0.0.1:{_free_port()}"
        self.extra: dict[str, tuple[str, ...]] = {"prefill2": ("--chunk-size", "16"),  # slow: killed mid-prompt
                                                  "decode3": ("--grace", "0.5")}

    def start(self, *names: str) -> None:
        """Start the named services at once ("cache", "prefill*", "decode*") and wait until all serve."""
        ready = {}
        for name in names:
            ready[name] = self.tmp / f"{name}-{time.monotonic_ns()}.json"
            if name == "cache":
                args = ["serve", "cache", "--listen", self.cache_listen, "--store-id", self.store_id,
                        "--allocation-ttl", "3", "--lease-ttl", "4"]  # what dead services held comes back soon
            else:
                args = ["serve", name.rstrip("0123456789"), "--model", str(self.model_dir), "--cache",
                        self.cache_listen, "--threads", "1", *self.extra.get(name, ()), *model_service_flags()]
            self.procs[name] = subprocess.Popen(qwenpd_cmd(*args, "--ready-file", str(ready[name]),
                                                           "--log-level", "ERROR"))
        for name in names:
            self.addr[name] = wait_ready_file(ready[name], self.procs[name])["address"]

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "cache"] + [n for n in self.procs if n == "cache"]:
            proc = self.procs.pop(name)
            proc.terminate()
            assert proc.wait(30) == 0, f"{name} exited with {proc.returncode}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    s = Stack(tiny_model_dir, tmp_path_factory.mktemp("recovery"))
    s.start("cache")
    try:
        s.start("prefill", "decode1", "decode2")
        yield s
    finally:
        s.stop()
    assert segments(s.store_id) == []


def _busy_decode(stack: Stack, names: list[str], timeout: float = 10.0) -> str:
    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in names:
            with grpc.insecure_channel(stack.addr[name]) as ch:
                load = decode_pb2_grpc.DecodeServiceStub(ch).GetLoad(decode_pb2.GetLoadRequest(), timeout=5)
            if load.active_sequences:
                return name
    raise AssertionError("no decode service is busy")


def _stream_with_kill(stack: Stack, names: list[str], kill_after: int, **options) -> tuple[list[int], str, str]:
    with Client(prefill=stack.addr["prefill"], decode=[stack.addr[n] for n in names], timeout=60) as c:
        ids: list[int] = []
        text: list[str] = []
        reason = None
        killed = ""
        for i, chunk in enumerate(c.stream("The crash test prompt", **options)):
            ids += chunk.token_ids
            text.append(chunk.text)
            reason = chunk.finish_reason or reason
            if i == kill_after:
                killed = _busy_decode(stack, names)
                stack.kill(killed)
        assert c.resumed == 1, "the stream ended before the kill: nothing was resumed"
    return ids, "".join(text), killed


def _ensure_two_decodes(stack: Stack) -> list[str]:
    missing = [n for n in ("decode1", "decode2") if n not in stack.procs]
    if missing:
        stack.start(*missing)
    return ["decode1", "decode2"]


@pytest.mark.parametrize("options", [
    pytest.param(dict(temperature=0), id="greedy"),
    pytest.param(dict(temperature=1.0, top_k=50, seed=1234), id="seeded"),
    pytest.param(dict(temperature=1.0, seed=7, stop=["ab", "e t", "xyz q"]), id="seeded-stop"),
    # the counts of what was generated cross the resume with the rest of the sampler's state
    pytest.param(dict(temperature=1.0, seed=11, presence_penalty=0.5, frequency_penalty=1.0), id="seeded-penalized"),
])
def test_decode_kill9_mid_stream_resumes_with_identical_output(stack, options):
    names = _ensure_two_decodes(stack)
    opts = {**LONG, **options}
    with Client(prefill=stack.addr["prefill"], decode=stack.addr[names[0]], timeout=60) as c:
        ref = c.generate("The crash test prompt", **opts)
    ids, text, killed = _stream_with_kill(stack, names, kill_after=3, **opts)
    assert killed and not pid_alive_name(stack, killed)
    assert ids == ref.token_ids
    assert text == ref.text


def pid_alive_name(stack: Stack, name: str) -> bool:
    proc = stack.procs.get(name)
    return proc is not None and pid_alive(proc.pid)


def test_resume_leaves_nothing_leased(stack):
    from qwenpd.cache_store.client import CacheStoreClient

    names = _ensure_two_decodes(stack)
    _stream_with_kill(stack, names, kill_after=2, temperature=0, **LONG)
    with CacheStoreClient(stack.addr["cache"]) as store:
        deadline = time.monotonic() + 5
        while (st := store.stats()).leases or st.allocations:
            assert time.monotonic() < deadline, f"still leased: {st}"
            time.sleep(0.05)


def test_sigterm_decode_goes_not_serving_drains_and_the_client_resumes(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _ensure_two_decodes(stack)
    stack.start("decode3")
    names = ["decode3", "decode2"]
    opts = dict(temperature=0.7, seed=99, max_tokens=1500, ignore_eos=True)
    with Client(prefill=stack.addr["prefill"], decode=stack.addr["decode2"], timeout=60) as c:
        ref = c.generate("The shutdown prompt", **opts)
    with Client(prefill=stack.addr["prefill"], decode=[stack.addr[n] for n in names], timeout=60) as c:
        ids: list[int] = []
        text = []
        for i, chunk in enumerate(c.stream("The shutdown prompt", **opts)):
            ids += chunk.token_ids
            text.append(chunk.text)
            if i == 3:
                victim = _busy_decode(stack, names)
                proc = stack.procs.pop(victim)
                with grpc.insecure_channel(stack.addr[victim]) as ch:  # a router watching health sees it go
                    watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
                    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                    proc.send_signal(signal.SIGTERM)
                    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert c.resumed == 1
    assert proc.wait(30) == 0
    assert ids == ref.token_ids and "".join(text) == ref.text


def test_decode_restarted_at_the_same_address_takes_over(stack):
    stack.extra["decode4"] = ("--listen", f"127.0.0.1:{_free_port()}")
    stack.start("decode4")
    opts = dict(temperature=0, max_tokens=1000, ignore_eos=True)
    with Client(prefill=stack.addr["prefill"], decode=stack.addr["decode4"], timeout=60) as c:
        ref = c.generate("The restart prompt", **opts)
        c.resume_wait_s = 120  # compiled, the restarted service answers after its warm-up
        ids: list[int] = []
        restart = threading.Thread(target=stack.start, args=("decode4",))
        for i, chunk in enumerate(c.stream("The restart prompt", **opts)):
            ids += chunk.token_ids
            if i == 3:
                stack.kill("decode4")
                restart.start()  # the stream waits for the address to answer again
        restart.join(120)
        assert c.resumed == 1
        assert ids == ref.token_ids
        stack.kill("decode4")
        c.resume_wait_s = 1.0  # nobody comes back this time
        with pytest.raises(Unavailable):
            c.generate("nobody left", **opts)


def test_prefill_kill9_is_retried_elsewhere_or_unavailable(stack):
    decode = stack.addr[_ensure_two_decodes(stack)[0]]
    stack.start("prefill2")
    doomed = stack.addr["prefill2"]
    long_prompt = [5 + (7 * i) % 500 for i in range(6000)]
    outcome: dict[str, object] = {}

    def call() -> None:
        with Client(prefill=doomed, decode=decode, timeout=60) as c:
            try:
                outcome["result"] = c.generate(token_ids=long_prompt, max_tokens=2, temperature=0)
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the long prompt is being encoded
    stack.kill("prefill2")
    worker.join(60)
    assert isinstance(outcome.get("error"), Unavailable), outcome
    with Client(prefill=[doomed, stack.addr["prefill"]], decode=decode, timeout=60) as c:
        for _ in range(2):
            assert len(c.generate("retried", max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
    from qwenpd.cache_store.client import CacheStoreClient

    with CacheStoreClient(stack.addr["cache"]) as store:  # what the killed prefill held expires
        deadline = time.monotonic() + 12
        while (st := store.stats()).leases or st.allocations:
            assert time.monotonic() < deadline, f"still held after the prefill died: {st}"
            time.sleep(0.1)


def test_cache_store_restart_reclaims_segments_and_stale_handles_are_not_found(stack):
    from qwenpd.clients.errors import from_rpc_error
    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    names = _ensure_two_decodes(stack)
    with grpc.insecure_channel(stack.addr["prefill"]) as ch:
        pre = prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(prefill_pb2.PrefillRequest(text="stale handle"),
                                                              timeout=30)
    assert segments(stack.store_id)
    stack.kill("cache")
    assert segments(stack.store_id), "kill -9 leaves the segments behind"
    stack.start("cache")  # same address and store id: reclaims the orphans at start
    assert segments(stack.store_id) == []
    with grpc.insecure_channel(stack.addr[names[0]]) as ch:
        call = decode_pb2_grpc.DecodeServiceStub(ch).Decode(
            decode_pb2.DecodeRequest(checkpoint_id=pre.checkpoint_id), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert isinstance(from_rpc_error(info.value), NotFound)
    with Client(prefill=stack.addr["prefill"], decode=[stack.addr[n] for n in names], timeout=60) as c:
        r = c.generate("after the restart", max_tokens=4, temperature=0, ignore_eos=True)
    assert len(r.token_ids) == 4
