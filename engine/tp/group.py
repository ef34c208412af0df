"""This process's place in a tensor-parallel group: the collectives inside the forward, the control group the
calls and state travel on, and the group's lifetime (a rank that dies breaks it: every later call raises
RankLost, UNAVAILABLE).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from qwenpd.engine.tp.plan import ShardPlan
from qwenpd.engine.tp import shm as shm_ops
from qwenpd.engine.tp.shm import _SHM, ShmCollectives
from qwenpd.errors import Unavailable

log = logging.getLogger("qwenpd.tp")

_CONTROL_TIMEOUT = timedelta(days=365)  # a follower waits for the next call as long as the leader lives


class RankLost(Unavailable):
    """A rank of the tensor-parallel group died (or broke the call protocol): the group cannot compute any more."""


class TPGroup:
    """Rank `rank` of `degree`; the leader (rank 0) also holds its followers' processes. `config` is the full
    model config (set by the engine). `calls` is the cross-rank call channel (calls.py)."""

    def __init__(self, degree: int, rank: int, followers: list[subprocess.Popen] | None = None,
                 host_memory: str | None = None):
        from qwenpd.engine.tp.calls import CallChannel

        self.degree, self.rank = degree, rank
        self.config = None
        self.leader = rank == 0
        self.control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
        self.compute = dist.group.WORLD
        self.followers = followers or []
        self.on_lost: Callable[[str], None] = lambda reason: None
        self.broken: str | None = None
        self._closed = False
        self._parent = os.getppid()
        self.calls = CallChannel(self)
        self.shm = None  # CPU ranks of one host: shared-memory collectives (shm.py)
        if host_memory is not None:
            self.shm = ShmCollectives.open(host_memory, degree, rank, self.control, self._peers_alive)
            if self.shm is not None:
                _SHM[id(self)] = self.shm
        if self.followers:
            threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def _peers_alive(self) -> bool:
        if self.leader:
            return all(p.poll() is None for p in self.followers)
        return os.getppid() == self._parent

    def plan(self) -> ShardPlan:
        """This rank's share of the model."""
        return ShardPlan(self.config, self.degree, self.rank)

    # ---- collectives inside the forward ---------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks (the row-parallel projections' partial outputs)."""
        from torch.distributed import _functional_collectives as funcol

        if self.shm is not None and self.shm.fits(t):
            return shm_ops.all_reduce(t, id(self))
        return funcol.all_reduce(t, "sum", self.compute)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V/n] vocabulary slices from every rank -> [N, V] (rank order is vocabulary order)."""
        from torch.distributed import _functional_collectives as funcol

        n, part = logits.shape
        if self.shm is not None and self.shm.fits(logits):
            stacked = shm_ops.all_gather(logits, id(self), self.degree)
        else:
            stacked = funcol.all_gather_single(logits.contiguous(), 0, self.compute)  # [degree * N, V/n]
        return stacked.view(self.degree, n, part).permute(1, 0, 2).reshape(n, self.degree * part)

    def measure_collectives(self, rows: int, iters: int, device: torch.device) -> float:
        """Seconds per decode step of `rows` sequences spent in the collectives alone (one all-reduce of
        [rows, hidden] fp32 for the embedding and per mixer and per MLP, then the logits' all-gather), each waited
        for as the forward waits."""
        c = self.config
        x = torch.ones(rows, c.hidden_size, device=device)
        part = torch.ones(rows, c.vocab_size // self.degree, device=device)

        def step() -> None:
            for _ in range(2 * c.num_hidden_layers + 1):
                float(self.all_reduce(x)[0, 0])
            float(self.gather_vocab(part)[0, 0])

        step()
        started = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - started) / iters

    def agree_bytes(self, nbytes: int) -> int:
        """The smallest of every rank's `nbytes` (all ranks call it while building their engines): page counts
        must match, or one rank would run out of pages where the leader did not."""
        t = torch.tensor([nbytes], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t)

    def agree_ok(self, ok: bool) -> bool:
        """True on every rank iff `ok` on every rank."""
        t = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return bool(int(t))

    def transfer(self, fn, *args, **kwargs) -> None:
        """Run a control-group collective (state gather/scatter); a failure there means a rank is gone."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.lose(f"tensor-parallel transfer failed: {exc}")

    # ---- lifetime ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        if self.broken is not None:
            raise RankLost(self.broken, subject="tensor_parallel")

    def check_ranks(self, wait_s: float = 1.0) -> None:
        """Leader: raise RankLost if a rank has exited (waiting up to `wait_s` for one whose connection just
        dropped to finish exiting)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.broken is not None or any(p.poll() is not None for p in self.followers):
                self.lose("a tensor-parallel rank failed")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def lose(self, reason: str) -> None:
        """Mark the group broken (once; `on_lost` runs) and raise RankLost."""
        dead = [f"tensor-parallel rank {rank} exited with code {proc.poll()}"
                for rank, proc in enumerate(self.followers, start=1) if proc.poll() is not None]
        if dead:  # the cause, rather than the failed transfer it caused
            reason = dead[0]
        if self.broken is None:
            self.broken = reason
            log.error("tensor-parallel group lost: %s", reason)
            try:
                self.on_lost(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_lost failed")
        raise RankLost(self.broken, subject="tensor_parallel")

    def _watch(self) -> None:
        """Leader: notice a follower that exits (the service must not wait on a collective that never meets)."""
        while not self._closed:
            for rank, proc in enumerate(self.followers, start=1):
                code = proc.poll()
                if code is not None and not self._closed:
                    with contextlib.suppress(RankLost):
                        self.lose(f"tensor-parallel rank {rank} exited with code {code}")
                    self.close()
                    return
            time.sleep(0.2)

    def close(self, timeout: float = 10.0) -> None:
        """Leader: tell the followers to leave, wait for them (kill what lingers). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.leader and self.broken is None:
            with contextlib.suppress(Exception):
                self.calls.send_close()
        deadline = time.monotonic() + timeout
        for proc in self.followers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _SHM.pop(id(self), None)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def rank_device(device: str, rank: int) -> str:
    """The device of `rank`: one accelerator per rank ("cuda" -> "cuda:<rank>"; on neuron with the process's
    NeuronCores split between the ranks, each sees only its own: "neuron"), the CPU shared."""
    if device == "neuron" and os.environ.get(SPLIT_CORES):
        return device
    if device in ("cuda", "neuron"):
        return f"{device}:{rank}"
    return device


SPLIT_CORES = "QWENPD_TP_SPLIT_CORES"  # set when launch gave each rank its share of NEURON_RT_VISIBLE_CORES
