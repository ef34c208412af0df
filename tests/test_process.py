"""Children die with the process that started them, set up without running Python between fork and exec
(qwenpd/process.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from qwenpd.process import dying_with_parent

MIDDLE = """
import subprocess, sys, time
from qwenpd.process import dying_with_parent
child = subprocess.Popen(dying_with_parent(["sleep", "60"]), start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_dies_with_its_parent_however_the_parent_dies():
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True)
    grandchild = int(middle.stdout.readline())
    time.sleep(0.3)
    assert _alive(grandchild)
    with open(f"/proc/{grandchild}/cmdline") as f:  # the trampoline exec'd into the command: same pid
        assert f.read().split("\0")[0] == "sleep"
    middle.kill()  # SIGKILL: no handler of the parent runs
    middle.wait()
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the child outlived its parent"


def test_the_trampoline_refuses_when_its_parent_is_already_gone():
    """Started for a parent that is not its parent (it died before the signal could be set): nothing runs."""
    argv = dying_with_parent(["sh", "-c", "echo ran"])
    argv[argv.index("--parent") + 1] = "1"
    run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "ran" not in run.stdout
