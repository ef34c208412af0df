"""EngineConfig: how to run a checkpoint, declared once.

Built once where the process starts (`generate`'s flags, a service's flags or its JSON config from `serve all`)
and passed down: `Engine(config)`; a tensor-parallel follower rank receives it as JSON; the prefill and decode
configs hold one (`ModelServiceConfig.engine`). Its flags are declared here as well (`add_args`, `from_args`),
so `generate`, `serve prefill|decode` and `serve all` share one declaration, one set of defaults and one
validation (`__post_init__`, a ValueError naming the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenpd.units import parse_kv_cache_size

QUANTIZE = ("fp8", "fp8-mlp", "int8")  # --quantize: engine/weights.py load_weights
DRAFT_QUANTIZE = ("int8",)  # --draft-quantize: engine/mtp.py load_head

DTYPE_NAMES = ("auto", "float32", "bfloat16")  # "auto": the checkpoint's own dtype
DELTANET_KERNELS = ("torch", "fla", "nki")
DEVICE_KINDS = ("cpu", "cuda", "neuron", "meta")
DEFAULT_PAGE_SIZE = 64

KVCacheSize = int | float
"""A KV cache size as given: an int is bytes, a float in (0, 1] is that fraction of the device's free memory."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to run the checkpoint in `model_dir`.

    dtype: weights and activations ('auto' keeps the stored dtype). threads: torch CPU threads (per rank; None =
    torch's default, split between the ranks of a CPU group). deltanet_kernels: 'torch' (the reference ops, NKI
    kernels registered on neuron), 'fla' (flash-linear-attention's chunked kernel, CUDA) or 'nki'. device: cpu |
    cuda[:N] | neuron | meta (its availability is checked when the engine is built). neuron_cores: NeuronCores
    this process may use ('0-3'; the process sets NEURON_RT_VISIBLE_CORES before the runtime starts).
    kv_cache_bytes: the paged KV cache, bytes (int) or a fraction in (0, 1] (float) of the device memory free
    once the weights are loaded; None = grows on demand (compiled: compiled_kv_cache_default). page_size: tokens per KV page (None = the role's
    default: DEFAULT_PAGE_SIZE, prefill a divisor of its block size). tp: tensor-parallel degree (ranks 1..tp-1
    are child processes). compile / compile_cache / whole_graphs: torch.compile the graphs the process runs at
    start (needs kv_cache_bytes), keep them in a directory across restarts, one graph per bucket on CPU too.
    warm_up: do a first request's one-time work while loading (Engine.warm_up), not inside the first request.
    quantize: round the decoder's projections to fp8 (128x128 blocks), fp8-mlp (the MLP's only) or int8 (per
    output channel, the lm_head too, held as int8) at load (engine/weights.py load_weights); None = as stored.
    draft_quantize: the MTP head's projections (and its own lm_head rows) weight-only int8 at load, whatever
    `quantize` is (engine/mtp.py load_head; speculative decoding only); None = as the model's.
    speculative: load the checkpoint's MTP head (Engine.draft_head; on a tensor-parallel group's leader) and hold
    its KV as more layers of the paged cache (engine/kv_cache.py), both before the cache is sized; the services
    and `generate` set it from --num-speculative-tokens."""

    model_dir: str
    dtype: str = "auto"
    threads: int | None = None
    deltanet_kernels: str = "torch"
    device: str = "cpu"
    neuron_cores: str | None = None
    kv_cache_bytes: KVCacheSize | None = None
    page_size: int | None = None
    tp: int = 1
    compile: bool = False
    compile_cache: str | None = None
    whole_graphs: bool = False
    warm_up: bool = True
    quantize: str | None = None
    draft_quantize: str | None = None
    speculative: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", str(self.model_dir))
        object.__setattr__(self, "device", str(self.device))
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.draft_quantize is not None and self.draft_quantize not in DRAFT_QUANTIZE:
            raise ValueError(f"draft_quantize must be one of {DRAFT_QUANTIZE}, got {self.draft_quantize!r}")
        if self.deltanet_kernels not in DELTANET_KERNELS:
            raise ValueError(f"deltanet_kernels must be one of {DELTANET_KERNELS}, got {self.deltanet_kernels!r}")
        if self.device.split(":", 1)[0] not in DEVICE_KINDS:
            raise ValueError(f"device must be one of {DEVICE_KINDS} (optionally ':N'), got {self.device!r}")
        if self.neuron_cores is not None:
            parse_cores(self.neuron_cores)
        check_kv_cache_size(self.kv_cache_bytes)
        if self.page_size is not None and self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.compile and self.kv_cache_bytes is None:  # compiled graphs need a fixed size: the default
            object.__setattr__(self, "kv_cache_bytes", compiled_kv_cache_default(self.device))

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @property
    def pages(self) -> int:
        """Tokens per KV page (the default where none was given)."""
        return self.page_size or DEFAULT_PAGE_SIZE

    def check_model(self) -> None:
        """ValueError unless `model_dir` holds a config.json that `tp` shards (heads, channels, vocabulary)."""
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"model_dir {self.model_dir!r} has no config.json")
        if self.tp > 1:
            from qwenpd.engine.config import ModelConfig
            from qwenpd.engine.tp.degree import check_degree

            check_degree(ModelConfig.from_pretrained(self.model_dir), self.tp)  # ShardingError names what misfits

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        return cls(**json.loads(text))


COMPILED_KV_CACHE_CPU = 2 << 30  # bytes, as vLLM's CPU backend takes a fixed KV size (its default is 4 GiB)
COMPILED_KV_CACHE_FRACTION = 0.45  # of the memory free on an accelerator: prefill and decode on one device both fit


def compiled_kv_cache_default(device: str) -> KVCacheSize:
    """The KV cache of a compiled engine given no size: a fixed 2 GiB on CPU, 45% of the device memory free once
    the weights are loaded elsewhere (services log what it came to)."""
    return COMPILED_KV_CACHE_CPU if device.split(":", 1)[0] == "cpu" else COMPILED_KV_CACHE_FRACTION


MAX_SPECULATIVE_TOKENS = 8  # --num-speculative-tokens at most (and the KV positions drafts may write past the end)


def check_draft_quantize(config: EngineConfig) -> None:
    """ValueError where --draft-quantize is given without speculative decoding (`generate` and the services check
    it before the model loads)."""
    if config.draft_quantize and not config.speculative:
        raise ValueError("--draft-quantize quantizes the MTP head, which runs only with --num-speculative-tokens K")


_CORES = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cores(spec: str) -> str:
    """Validate a NeuronCore list such as '0-3' or '0,2,4-5'; returns it unchanged."""
    if not _CORES.match(spec):
        raise ValueError(f"neuron cores must look like '0-3' or '0,1,4-7', got {spec!r}")
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            raise ValueError(f"neuron core range {part!r} runs backwards")
    return spec


def check_kv_cache_size(size: KVCacheSize | None) -> None:
    """ValueError unless `size` is None, a positive int (bytes) or a float in (0, 1] (a fraction)."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"kv_cache_bytes must be a byte count or a fraction in (0, 1], got {size!r}")
    if isinstance(size, int) and size < 1:
        raise ValueError(f"kv_cache_bytes must be positive, got {size}")
    if isinstance(size, float) and not 0.0 < size <= 1.0:
        raise ValueError(f"kv_cache_bytes as a fraction of free device memory must be in (0, 1], got {size}")


# ---- flags --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Flag:
    field: str
    help: str
    options: dict[str, Any]
    per_role: str | None = None  # `serve all`: one flag per role, named --{role}-<this>; None: one for all


_FLAGS = (
    _Flag("dtype", "weights and activations; auto keeps the checkpoint's dtype (default %(default)s)",
          {"choices": DTYPE_NAMES}),
    _Flag("device", "torch device: cpu | cuda[:N] | neuron (default %(default)s)", {}, per_role="device"),
    _Flag("neuron_cores", "NeuronCores this process may use, e.g. 0-3 (sets NEURON_RT_VISIBLE_CORES; trn2: "
          "prefill and decode on disjoint sets of one host)", {"metavar": "LIST"}, per_role="cores"),
    _Flag("tp", "tensor-parallel degree: ranks started to shard the model over (default %(default)s; any prefill "
          "and decode degrees hand off exactly)", {"type": int}, per_role="tp"),
    _Flag("threads", "torch CPU threads (per rank; default: torch's, split between the ranks)", {"type": int}),
    _Flag("kv_cache_bytes", "paged KV cache: bytes (e.g. 8GiB) or a fraction of the device memory free once the "
          "weights are loaded (e.g. 0.9 or 90%%) (default: grows on demand; with --compile a fixed size: generate "
          "the pages its prompt and --max-tokens need, services 2GiB on CPU and 45%% of free memory elsewhere)",
          {"type": parse_kv_cache_size, "metavar": "SIZE"}),
    _Flag("page_size", f"tokens per KV page (default {DEFAULT_PAGE_SIZE}; prefill: gcd({DEFAULT_PAGE_SIZE}, "
          "--block-size), a divisor of its block size)", {"type": int}),
    _Flag("deltanet_kernels", "DeltaNet kernels: torch (reference ops; NKI kernels on neuron), fla "
          "(flash-linear-attention's chunked prefill kernel, CUDA) or nki (default %(default)s)",
          {"choices": DELTANET_KERNELS}),
    _Flag("compile", "torch.compile the prefill chunks / decode steps this process runs over static buckets at "
          "start (over a fixed-size KV cache: see --kv-cache-bytes)", {"action": "store_true"}),
    _Flag("compile_cache", "keep compiled graphs in this directory across restarts", {"metavar": "DIR"}),
    _Flag("quantize", "round the decoder's projections at load: fp8 (128x128 blocks, the published FP8 recipe), "
          "fp8-mlp (the MLP only; fp8 is multiplied in the model dtype on CPU) or int8 (weight-only, per output "
          "channel, the lm_head too; held as int8, decode steps by qwenpd's int8 kernel on CPU, or aten's where the "
          "CPU lacks AVX512-BF16/VBMI) (default: as stored)",
          {"choices": QUANTIZE}),
    _Flag("draft_quantize", "with --num-speculative-tokens: the MTP head's projections weight-only int8 at load "
          "(drafts only decide how many tokens a verify pass accepts, never which: tokens stay the model's, "
          "drafting reads half the bytes; CPU bf16, where decode steps have an int8 kernel) (default: as the "
          "model's)", {"choices": DRAFT_QUANTIZE}),
    _Flag("whole_graphs", "with --compile on CPU: one graph per bucket instead of one region per layer kind "
          "(slower warm-up, faster steps; neuron and CUDA always compile whole graphs)", {"action": "store_true"}),
)
FIELDS = tuple(f.field for f in _FLAGS)


def add_args(p: argparse.ArgumentParser, defaults: EngineConfig | None = None, roles: Sequence[str] = ()) -> None:
    """The engine's flags (`--model` is the caller's), defaults from `defaults`. With `roles` (`serve all`:
    prefill, decode), a per-role option gets one flag per role (`--prefill-device`, `--decode-tp`)."""
    d = defaults or EngineConfig(model_dir="")
    for flag in _FLAGS:
        kw = dict(flag.options)
        if kw.get("action") != "store_true":
            kw["default"] = getattr(d, flag.field)
        if roles and flag.per_role:
            for role in roles:
                p.add_argument(f"--{role}-{flag.per_role}", dest=f"{role}_{flag.field}", help=f"{role}: {flag.help}",
                               **kw)
        else:
            p.add_argument("--" + flag.field.replace("_", "-"), dest=flag.field, help=flag.help, **kw)


def from_args(args: argparse.Namespace, model_dir: str, role: str | None = None, **changes: Any) -> EngineConfig:
    """The EngineConfig the flags of `add_args` describe (for `role`, its per-role flags where given so)."""
    kw: dict[str, Any] = {}
    for flag in _FLAGS:
        per_role = f"{role}_{flag.field}"
        if role is not None and flag.per_role and hasattr(args, per_role):
            kw[flag.field] = getattr(args, per_role)
        elif hasattr(args, flag.field):
            kw[flag.field] = getattr(args, flag.field)
    return EngineConfig(model_dir=model_dir, **{**kw, **changes})
