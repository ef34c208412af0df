"""PrefillConfig: everything the prefill service is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import math

from qwenpd import service_config
from qwenpd.units import parse_bytes
from qwenpd.engine.engine_config import DEFAULT_PAGE_SIZE, EngineConfig
from qwenpd.model_service import ModelServiceConfig, add_model_service_args, model_service_from_args
from qwenpd.prefill_service.prefix_policy import DEFAULT_BLOCK_SIZE, DEFAULT_SNAPSHOT_INTERVAL, PrefixPolicy


@dataclass(slots=True)
class PrefillConfig(ModelServiceConfig):
    """The shared fields (qwenpd.model_service.ModelServiceConfig; the engine's page_size defaults to
    gcd(64, block_size), so a prefix-cache block is whole pages), plus: chunk_size: prompt tokens per
    prefill chunk. max_queue: requests that may wait behind the running one. handoff_ttl_s: how long a
    checkpoint waits for its decode request (None = the store's default). model_name: the name ModelInfo
    reports (default: the checkpoint folder's). block_size / snapshot_interval / prefix_cache: the prefix
    cache (prefix_policy.py)."""

    max_queue: int = 64
    chunk_size: int = 512
    handoff_ttl_s: float | None = None
    model_name: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    snapshot_interval: int = DEFAULT_SNAPSHOT_INTERVAL
    prefix_cache: bool = True
    encoder_cache_bytes: int = 256 << 20  # the vision tower's output kept per image (models with a vision tower)

    def __post_init__(self) -> None:
        self.prefix_policy  # validates block_size / snapshot_interval
        if self.engine.page_size is None:
            self.engine = self.engine.replace(page_size=math.gcd(DEFAULT_PAGE_SIZE, self.block_size))
        ModelServiceConfig.__post_init__(self)
        if self.block_size % self.engine.page_size:
            raise ValueError(f"page_size {self.engine.page_size} must divide block_size {self.block_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.encoder_cache_bytes < 0:
            raise ValueError(f"encoder_cache_bytes must be >= 0, got {self.encoder_cache_bytes}")
        if self.handoff_ttl_s is not None and self.handoff_ttl_s <= 0:
            raise ValueError(f"handoff_ttl_s must be > 0, got {self.handoff_ttl_s}")

    @property
    def prefix_policy(self) -> PrefixPolicy:
        return PrefixPolicy(self.block_size, self.snapshot_interval, self.prefix_cache)

    @property
    def name(self) -> str:
        return self.model_name or checkpoint_name(self.model_dir)


def checkpoint_name(model_dir: str) -> str:
    """What a checkpoint calls itself: config.json's `_name_or_path` (transformers writes the hub id there), else
    the folder's name."""
    try:
        name = json.loads((Path(model_dir) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    return name if isinstance(name, str) and name.strip() else Path(model_dir).resolve().name


def add_args(p: argparse.ArgumentParser) -> None:
    d = service_config.field_defaults(PrefillConfig)
    add_model_service_args(p, d, EngineConfig(model_dir=""))
    p.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help=f"prompt tokens per prefill chunk (default {d.chunk_size})")
    p.add_argument("--handoff-ttl", type=float, default=d.handoff_ttl_s, dest="handoff_ttl_s",
                   help="seconds a checkpoint waits for its decode call")
    p.add_argument("--model-name", default=d.model_name, help="the name GetModelInfo reports (default: the "
                   "checkpoint's _name_or_path, else its folder)")
    add_prefix_args(p)
    p.add_argument("--encoder-cache-bytes", type=parse_bytes, default=d.encoder_cache_bytes,
                   help="vision tower output kept per image, so a repeated image skips the tower (default "
                        f"{d.encoder_cache_bytes >> 20} MiB; 0 = off)")


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    d = PrefixPolicy()  # the prefix-cache defaults (PrefillConfig takes the same)
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help=f"prefix cache: tokens per KV block (default {d.block_size})")
    p.add_argument("--snapshot-interval", type=int, default=d.snapshot_interval,
                   help=f"prefix cache: DeltaNet snapshot every N tokens, a multiple of --block-size (default "
                        f"{d.snapshot_interval}; 0 = only at the last block boundary inside each prompt)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="turn the prefix cache off (every prompt is encoded from scratch)")


def config_from_args(args: argparse.Namespace) -> PrefillConfig:
    return model_service_from_args(PrefillConfig, args)
