"""Two `serve all` on one host (issue 21, item 9): by default each gets a store id of its own, so both serve; two
given the same --store-id: the second stops with one line naming the flag, no traceback, and the first is
untouched."""

from __future__ import annotations

import os
import subprocess

from tests.services.conftest import pid_alive, qwenpd_cmd, segments, wait_ready_file


def _serve_all(model, tmp, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(qwenpd_cmd("serve", "all", "--model", str(model), "--threads", "1", "--no-gateway",
                                       "--ready-file", str(tmp / f"{name}.json"), "--log-level", "WARNING", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_deployments_on_one_host(tiny_model_dir, tmp_path):
    first, second = _serve_all(tiny_model_dir, tmp_path, "a"), _serve_all(tiny_model_dir, tmp_path, "b")
    try:
        a = wait_ready_file(tmp_path / "a.json", first)
        b = wait_ready_file(tmp_path / "b.json", second)
        assert a["cache"] != b["cache"] and pid_alive(a["pid"]) and pid_alive(b["pid"])
    finally:
        for proc in (first, second):
            proc.terminate()
        assert [p.wait(60) for p in (first, second)] == [0, 0]

    store = f"same{os.getpid()}"
    owner = _serve_all(tiny_model_dir, tmp_path, "owner", "--store-id", store)
    try:
        wait_ready_file(tmp_path / "owner.json", owner)
        clash = _serve_all(tiny_model_dir, tmp_path, "clash", "--store-id", store)
        _, err = clash.communicate(timeout=120)
        assert clash.returncode == 1, err
        assert "--store-id" in err and "Traceback" not in err, err
        assert "restarting" not in err  # it said why it cannot start: starting it again would not help
        assert owner.poll() is None
    finally:
        owner.terminate()
        assert owner.wait(60) == 0
    assert segments(store) == []
