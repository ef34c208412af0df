"""Starting a tensor-parallel group: the leader starts ranks 1..tp-1 as child processes, each builds its shard of
the engine from the leader's EngineConfig (sent as JSON) and follows the leader's calls (calls.py) until it
closes the group. Followers die with the leader (PR_SET_PDEATHSIG).

    python -m qwenpd.engine.tp.launch --rank R --port P --config JSON     (a follower; started by `launch`)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch.distributed as dist

from qwenpd.engine.engine_config import EngineConfig
from qwenpd.engine.tp.group import SPLIT_CORES, TPGroup, rank_device
from qwenpd.process import die_with_parent

log = logging.getLogger("qwenpd.tp")

_COMPUTE_TIMEOUT = timedelta(minutes=10)  # a collective inside a call (compiling a bucket included)


def launch(config: EngineConfig) -> TPGroup:
    """Leader: start ranks 1..tp-1 as child processes and join the group as rank 0. One group per process
    (torch.distributed has one default group): close() an engine's group before starting another."""
    if dist.is_initialized():
        raise RuntimeError("this process already leads a tensor-parallel group: close() that engine first")
    port = _free_port()
    followers = []
    env = dict(os.environ)
    shares = None
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if config.device == "neuron" and visible:  # the service's NeuronCores, split evenly between its ranks
        from qwenpd.engine.device import split_cores

        shares = split_cores(visible, config.tp)
        os.environ["NEURON_RT_VISIBLE_CORES"], os.environ[SPLIT_CORES] = shares[0], "1"
    for rank in range(1, config.tp):
        if shares is not None:
            env = {**env, "NEURON_RT_VISIBLE_CORES": shares[rank], SPLIT_CORES: "1"}
        cmd = [sys.executable, "-m", "qwenpd.engine.tp.launch", "--rank", str(rank), "--port", str(port),
               "--config", config.to_json()]
        followers.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
    try:
        _init(0, config, port)
    except BaseException:
        for proc in followers:
            proc.kill()
            proc.wait()
        raise
    return TPGroup(config.tp, 0, followers, _host_memory(config, port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_memory(config: EngineConfig, port: int) -> str | None:
    """The shared-memory file of CPU ranks' collectives (named by the group's rendezvous port); None elsewhere."""
    if not config.device.startswith("cpu") or not os.path.isdir("/dev/shm"):
        return None
    return f"/dev/shm/qwenpd-tp-{port}"


def _init(rank: int, config: EngineConfig, port: int) -> None:
    """Join the group: nccl on CUDA, TorchNeuron's "neuron" backend on trn2 (registered by importing
    torch_neuronx; not run here: no Neuron SDK), gloo on CPU."""
    backend = "gloo"
    if config.device.startswith("cuda"):
        backend = "nccl"
    elif config.device.startswith("neuron"):
        import torch_neuronx  # noqa: F401 - registers the neuron device and its distributed backend

        backend = "neuron"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.tp,
                            timeout=_COMPUTE_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    """A follower rank (started by launch)."""
    parser = argparse.ArgumentParser(prog="qwenpd.engine.tp.launch")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", required=True, help="the leader's EngineConfig as JSON")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp-rank{args.rank} %(levelname)s %(message)s")
    config = EngineConfig.from_json(args.config)
    _init(args.rank, config, args.port)
    from qwenpd.engine.engine import Engine

    group = TPGroup(config.tp, args.rank, host_memory=_host_memory(config, args.port))
    try:
        engine = Engine(config.replace(device=rank_device(config.device, args.rank)), group=group)
        group.calls.follow(engine)
    except Exception as exc:  # noqa: BLE001 - the leader is gone, the group broke, or this rank fell out of step
        log.warning("rank %d leaves: %s", args.rank, exc)
        return 1
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # run as the package's module, so pickled Calls and this code share one class
    from qwenpd.engine.tp.launch import main as _main

    sys.exit(_main())
