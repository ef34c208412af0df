"""`qwenpd serve all` as a supervisor: it hands each child its real config object (as JSON), starts a gateway in
front, and restarts a crashed child in place, so a stream through the gateway completes as if nothing happened."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
import urllib.request

import grpc
import pytest

from qwenpd.cache_store.config import CacheStoreConfig
from qwenpd.decode_service.config import DecodeConfig
from qwenpd.gateway.config import GatewayConfig
from qwenpd.engine.engine_config import EngineConfig
from qwenpd.limits import Limits
from qwenpd.prefill_service.config import PrefillConfig
from qwenpd.protos.qwenpd.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from qwenpd.supervisor import ServiceSet, config_from_json, config_to_json
from tests.services.conftest import pid_alive, segments, start_serve_all, stop_serve_all


def test_configs_travel_to_children_unchanged(tiny_model_dir):
    model = str(tiny_model_dir)
    for config in (CacheStoreConfig(store_id="x1", budget_bytes=1 << 30),
                   PrefillConfig(engine=EngineConfig(model, threads=2), cache="127.0.0.1:5", chunk_size=64,
                                 limits=Limits(max_new_tokens=99), prefix_cache=False),
                   DecodeConfig(engine=EngineConfig(model), cache="127.0.0.1:5", max_batch=3),
                   GatewayConfig(prefill=("a:1", "b:2"), decode=("c:3",), http_listen="127.0.0.1:0")):
        assert config_from_json(config_to_json(config)) == config


def test_build_routes_each_option_to_the_configs_that_have_it(tiny_model_dir):
    s = ServiceSet.build(str(tiny_model_dir), gateway=True, threads=2, max_batch=4, store_id="abc",
                         grace_s=1.0, metrics_port=9000)
    assert (s.prefill_config.engine.threads, s.decode_config.engine.threads, s.decode_config.max_batch) == (2, 2, 4)
    assert s.cache_config.store_id == "abc"
    assert {c.grace_s for c in (s.cache_config, s.prefill_config, s.decode_config, s.gateway_config)} == {1.0}
    assert [c.metrics_port for c in (s.cache_config, s.prefill_config, s.decode_config, s.gateway_config)] == \
        [9000, 9001, 9002, 9003] and s.metrics_port == 9004
    with pytest.raises(TypeError):
        ServiceSet.build(str(tiny_model_dir), no_such_option=1)


def _free_ports(n: int) -> int:
    """A base port with n free ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for i in range(n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def test_kill9_of_the_decode_child_is_restarted_and_the_stream_completes(tiny_model_dir, tmp_path):
    metrics = _free_ports(5)
    # the gateway holds the broken stream until the restarted decode answers (compiled: after its warm-up)
    s = start_serve_all(tiny_model_dir, tmp_path, f"sup{os.getpid()}", "--metrics-port", str(metrics),
                        "--resume-wait", "120")
    try:
        assert s.gateway and s.http
        request = generate_pb2.GenerateRequest(text="The supervised prompt", sampling=common_pb2.SamplingParams(
            temperature=0.9, seed=3, max_tokens=600, ignore_eos=True))
        with grpc.insecure_channel(s.gateway) as ch:
            stub = generate_pb2_grpc.GenerateServiceStub(ch)
            ref = list(stub.Generate(request, timeout=60))
            got = []
            for i, chunk in enumerate(stub.Generate(request, timeout=180)):
                got.append(chunk)
                if i == 3:
                    os.kill(s.children["decode"], signal.SIGKILL)
        assert [t for c in got for t in c.token_ids] == [t for c in ref for t in c.token_ids]
        assert "".join(c.text for c in got) == "".join(c.text for c in ref)
        assert got[-1].timings.resumes == 1
        ready = json.loads((tmp_path / f"sup{os.getpid()}.json").read_text())
        assert ready["decode"] == s.decode and ready["children"]["decode"] != s.children["decode"]
        assert pid_alive(ready["children"]["decode"]) and s.proc.poll() is None
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics + 4}/metrics", timeout=10).read().decode()
        assert 'qwenpd_child_restarts_total{role="decode"} 1.0' in scrape
        gateway_metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics + 3}/metrics", timeout=10).read()
        assert b"qwenpd_gateway_resumes_total 1.0" in gateway_metrics
        s.children = ready["children"]
        os.kill(s.children["cache store"], signal.SIGKILL)  # restarted in place, reclaims its orphans
        short = generate_pb2.GenerateRequest(text="after the store", sampling=common_pb2.SamplingParams(
            temperature=0, max_tokens=5, ignore_eos=True))
        deadline = time.monotonic() + 60
        while True:
            try:
                with grpc.insecure_channel(s.gateway) as ch:
                    stub = generate_pb2_grpc.GenerateServiceStub(ch)
                    assert sum(len(c.token_ids) for c in stub.Generate(short, timeout=30)) == 5
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "nothing served after the cache store restart"
                time.sleep(0.5)
        ready = json.loads((tmp_path / f"sup{os.getpid()}.json").read_text())
        assert ready["cache"] == s.cache and ready["children"]["cache store"] != s.children["cache store"]
        s.children = ready["children"]
    finally:
        assert stop_serve_all(s) == 0
    assert not any(pid_alive(p) for p in s.children.values())
    time.sleep(0.1)
    assert segments(s.store_id) == []


def test_compiled_children_get_a_compile_cache_for_restarts(tiny_model_dir, tmp_path):
    from qwenpd.supervisor import _with_compile_cache

    compiled = DecodeConfig(engine=EngineConfig(str(tiny_model_dir), compile=True, kv_cache_bytes=1 << 20),
                            cache="127.0.0.1:5")
    got = _with_compile_cache(compiled, "127.0.0.1:6", tmp_path / "c")
    assert (got.cache, got.engine.compile_cache) == ("127.0.0.1:6", str(tmp_path / "c"))
    own = dataclasses.replace(compiled, engine=compiled.engine.replace(compile_cache="/kept"))
    assert _with_compile_cache(own, "127.0.0.1:6", tmp_path / "c").engine.compile_cache == "/kept"
    eager = DecodeConfig(engine=EngineConfig(str(tiny_model_dir)), cache="127.0.0.1:5")
    assert _with_compile_cache(eager, "127.0.0.1:6", tmp_path / "c").engine.compile_cache is None


def test_a_child_that_dies_during_start_up_is_started_again(tiny_model_dir):
    """A child that exits before it first serves costs one restart of its budget, not the whole start."""
    import threading

    s = ServiceSet.build(str(tiny_model_dir), gateway=False, threads=1, store_id=f"startup{os.getpid()}",
                         log_level="WARNING")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            s.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=start)
    t.start()
    try:
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:  # kill -9 the prefill child before it serves
            prefill = next((c for c in s.children if c.role == "prefill" and c.proc is not None), None)
            if prefill is not None and not prefill.ready_file.exists():
                prefill.proc.kill()
                killed = prefill.proc.pid
            time.sleep(0.01)
        assert killed is not None, "prefill served before it could be killed"
        t.join(timeout=180)
        assert not t.is_alive() and not errors, errors
        prefill = next(c for c in s.children if c.role == "prefill")
        assert prefill.proc.pid != killed and len(prefill.restarts) == 1 and prefill.address
    finally:
        t.join(timeout=180)
        s.stop()
