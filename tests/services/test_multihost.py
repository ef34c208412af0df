"""Prefill and decode on different "hosts": two network namespaces, each joined to the root namespace by a veth
pair, where the mooncake master and the cache store run. Only addresses this test creates are used
(10.<n>.1.0/24 and 10.<n>.2.0/24 on its own veths). Skips where namespaces cannot be made or mooncake is missing.

    root  10.n.1.1 ── veth ── 10.n.1.2  ns A: prefill
          10.n.2.1 ── veth ── 10.n.2.2  ns B: decode          (cache store + mooncake master on 10.n.1.1)
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from qwenpd.clients import Client
from qwenpd.supervisor import ServiceSet
from qwenpd.engine.generate import generate
from qwenpd.engine.sampling import SamplingParams
from tests.services.conftest import mooncake_skip_reason

GREEDY = dict(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a small model. " * 6]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class Hosts:
    """Two namespaces wired to the root namespace; removed on close (deleting a namespace removes its veths)."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.net = 10 + os.getpid() % 200  # 10.<net>.x.y on our own veths only
        self.ns = [f"qpd{tag}a", f"qpd{tag}b"]
        self.root_ip = [f"10.{self.net}.1.1", f"10.{self.net}.2.1"]
        self.ns_ip = [f"10.{self.net}.1.2", f"10.{self.net}.2.2"]
        self.made: list[str] = []

    def create(self) -> "Hosts":
        for i, ns in enumerate(self.ns):
            outer, inner = f"{ns}r", f"{ns}n"
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            _ip("addr", "add", f"{self.root_ip[i]}/24", "dev", outer)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{self.ns_ip[i]}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # the store and master live on root_ip[0]: reachable from either namespace through its own veth
            _ip("-n", ns, "route", "add", "default", "via", self.root_ip[i])
        return self

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made.clear()


def _netns_skip_reason() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"qpdprobe{os.getpid() % 10000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"the sandbox forbids network namespaces: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@pytest.fixture(scope="module")
def hosts():
    reason = mooncake_skip_reason() or _netns_skip_reason()
    if reason:
        pytest.skip(reason)
    h = Hosts()
    try:
        h.create()
    except subprocess.CalledProcessError as exc:
        h.close()
        pytest.skip(f"cannot wire network namespaces: {exc.stderr.strip()}")
    yield h
    h.close()


@pytest.fixture(scope="module")
def master(hosts):
    from qwenpd.cache_store.mooncake_master import MooncakeMaster

    with MooncakeMaster(hosts.root_ip[0]) as m:
        yield m


@pytest.fixture(scope="module")
def split(hosts, master, tiny_model_dir):
    s = ServiceSet.build(str(tiny_model_dir), host=hosts.root_ip[0], threads=1, log_level="WARNING",
                   store_id=f"mh{os.getpid()}", backend="mooncake", mooncake_master=master.address,
                   mooncake_metadata=master.metadata_url, prefill_host=hosts.ns_ip[0], prefill_netns=hosts.ns[0],
                   decode_host=hosts.ns_ip[1], decode_netns=hosts.ns[1], start_timeout_s=90, gateway=False)
    with s:
        yield s


def test_prefill_and_decode_on_two_hosts_equal_one_host(split, engine, hosts):
    assert split.prefill.startswith(hosts.ns_ip[0]) and split.decode.startswith(hosts.ns_ip[1])
    with Client(prefill=split.prefill, decode=split.decode, timeout=60) as client:
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(prompt)
            want = generate(engine, ids, SamplingParams(**GREEDY)).token_ids
            assert client.generate(token_ids=ids, **GREEDY).token_ids == want
