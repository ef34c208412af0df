"""Process lifetime helpers shared by every part that starts child processes (plain Python).

Children must die with the process that started them, however it dies (PR_SET_PDEATHSIG). That used to be set
by `preexec_fn`, which runs Python in the forked child before exec: in a parent with live gRPC threads (the
supervisor's health checks) the child then ran gRPC's at-fork handlers over the parent's pollers and sometimes
aborted ("epoll_wait error: Bad file descriptor", exit -6) before it ever exec'd. Now a child starts through a
small trampoline (`dying_with_parent`): a fresh interpreter that sets the signal and execs the real command, so
nothing runs between fork and exec.

    python -m qwenpd.process --signal N --parent PID -- COMMAND ARGS...     (the trampoline)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send `sig` to this process when its parent dies, however the parent dies (no
    orphans). Call it in the child itself; elsewhere it does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def dying_with_parent(argv: list[str], sig: int = signal.SIGKILL) -> list[str]:
    """`argv` as a command that gets `sig` when this process dies: started through the trampoline, which sets
    PR_SET_PDEATHSIG and execs it (the setting survives exec). Pass it to subprocess.Popen without preexec_fn."""
    return [sys.executable, "-m", "qwenpd.process", "--signal", str(int(sig)), "--parent", str(os.getpid()), "--",
            *argv]


def main(argv: list[str] | None = None) -> int:
    """The trampoline: set the parent-death signal, make sure the parent is still the one that started us (it
    may have died before the signal was set), then exec the command."""
    parser = argparse.ArgumentParser(prog="qwenpd.process")
    parser.add_argument("--signal", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    die_with_parent(args.signal)
    if os.getppid() != args.parent:
        return 1  # the parent is already gone
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
