"""DecodeConfig: everything the decode service is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from qwenpd import service_config
from qwenpd.engine.engine_config import DEFAULT_PAGE_SIZE, EngineConfig
from qwenpd.model_service import ModelServiceConfig, add_model_service_args, model_service_from_args


@dataclass(slots=True)
class DecodeConfig(ModelServiceConfig):
    """The shared fields (qwenpd.model_service.ModelServiceConfig; the engine's page_size defaults to 64), plus:
    max_batch: sequences stepped together. max_queue: sequences that may wait for a slot. (default_max_tokens applies when a request
    overrides sampling without giving max_tokens; limits bound those overrides.)"""

    max_queue: int = 256
    max_batch: int = 32

    def __post_init__(self) -> None:
        if self.engine.page_size is None:
            self.engine = self.engine.replace(page_size=DEFAULT_PAGE_SIZE)
        ModelServiceConfig.__post_init__(self)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


def add_args(p: argparse.ArgumentParser) -> None:
    d = service_config.field_defaults(DecodeConfig)
    add_model_service_args(p, d, EngineConfig(model_dir=""))
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"sequences stepped together (default {d.max_batch})")


def config_from_args(args: argparse.Namespace) -> DecodeConfig:
    return model_service_from_args(DecodeConfig, args)
