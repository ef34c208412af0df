"""Which torch device the engine runs on, and NeuronCore partitioning. No global device state: the device is
an argument of the engine, and every tensor it makes is created on it.

- "cpu", "cuda" (or "cuda:N"), "neuron" (TorchNeuron, torch-neuronx imported lazily) and "meta" (shapes only:
  tests run a whole prefill + decode on it to prove nothing in the engine assumes CPU).
- `--neuron-cores 0-3` sets NEURON_RT_VISIBLE_CORES for this process before the runtime starts, so prefill and
  decode on one trn2 host use disjoint cores.
"""

from __future__ import annotations

import os

import torch

from qwenpd.engine.engine_config import DEVICE_KINDS, parse_cores



def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu' | 'cuda[:N]' | 'neuron[:N]' | 'meta' -> torch.device; ValueError if it is not usable here."""
    text = str(name)
    kind = text.split(":", 1)[0]
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device must be one of {DEVICE_KINDS} (optionally ':N'), got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    if kind == "neuron":
        try:
            import torch_neuronx  # noqa: F401 - registers the 'neuron' device (TorchNeuron)
        except ImportError as e:
            raise ValueError(f"device 'neuron' needs torch-neuronx (the `neuron` extra): {e}") from None
    return torch.device(text)


def expand_cores(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    out: list[int] = []
    for part in parse_cores(spec).split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def split_cores(spec: str, parts: int) -> list[str]:
    """A NeuronCore list split evenly between `parts` tensor-parallel ranks, in order ('0-7', 2 -> '0-3', '4-7'
    as '0,1,2,3' and '4,5,6,7'). ValueError unless it divides."""
    cores = expand_cores(spec)
    if len(cores) % parts:
        raise ValueError(f"{len(cores)} neuron cores ({spec}) do not split evenly between {parts} ranks")
    per = len(cores) // parts
    return [",".join(str(c) for c in cores[r * per:(r + 1) * per]) for r in range(parts)]


def set_neuron_cores(spec: str | None) -> None:
    """Make only `spec`'s NeuronCores visible to this process (before the Neuron runtime starts)."""
    if spec:
        os.environ["NEURON_RT_VISIBLE_CORES"] = parse_cores(spec)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (timings); a no-op where work is synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "neuron":
        torch.neuron.synchronize()  # type: ignore[attr-defined]


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: CUDA from the driver (torch.cuda.mem_get_info), CPU MemAvailable from
    /proc/meminfo, neuron from torch-neuronx where it reports it. ValueError where it cannot be told (meta, a CPU
    without /proc/meminfo, a torch-neuronx without a memory query)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return _mem_available()
    if device.type == "neuron":
        import torch_neuronx  # noqa: F401 - registers torch.neuron (TorchNeuron)

        query = getattr(getattr(torch, "neuron", None), "mem_get_info", None)
        if query is not None:
            return int(query(device)[0])
    raise ValueError(f"cannot tell the free memory of device {str(device)!r}; give --kv-cache-bytes as a size "
                     "(e.g. 8GiB) instead of a fraction")


def _mem_available(meminfo: str = "/proc/meminfo") -> int:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # "MemAvailable:  123456 kB"
    except OSError:
        pass
    raise ValueError(f"cannot read MemAvailable from {meminfo}; give --kv-cache-bytes as a size (e.g. 8GiB) "
                     "instead of a fraction")
