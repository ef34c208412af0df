"""DecodeConfig: everything the decode service is started with, built once from CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from qwenpd import service_config
from qwenpd.decode_service.policy import POLICIES
from qwenpd.engine.engine_config import DEFAULT_PAGE_SIZE, EngineConfig
from qwenpd.model_service import ModelServiceConfig, add_model_service_args, model_service_from_args


@dataclass(slots=True)
class DecodeConfig(ModelServiceConfig):
    """The shared fields (qwenpd.model_service.ModelServiceConfig; the engine's page_size defaults to 64), plus:
    max_batch: sequences stepped together. max_queue: sequences that may wait for a slot. (default_max_tokens applies when a request
    overrides sampling without giving max_tokens; limits bound those overrides.) checkpoint_every: write each
    sequence's state to the cache store every this many tokens, so a crash resume replays at most that many decode
    steps (0 = never: a resume replays every token generated since the hand-off). speculative_max_batch: with
    num_speculative_tokens, a step of more sequences than this drafts nothing (each sequence feeds one token):
    past it, verifying drafts costs more than it saves (bench/spec_decode.py). speculative_policy: below that,
    "adaptive" drafts where the measured step times and acceptance say it pays, "always" at every step
    (decode_service/policy.py)."""

    max_queue: int = 256
    max_batch: int = 32
    checkpoint_every: int = 0
    speculative_max_batch: int = 2
    speculative_policy: str = "adaptive"

    def __post_init__(self) -> None:
        if self.engine.page_size is None:
            self.engine = self.engine.replace(page_size=DEFAULT_PAGE_SIZE)
        ModelServiceConfig.__post_init__(self)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.speculative_max_batch < 1:
            raise ValueError(f"speculative_max_batch must be >= 1, got {self.speculative_max_batch}")
        if self.speculative_policy not in POLICIES:
            raise ValueError(f"speculative_policy must be one of {POLICIES}, got {self.speculative_policy!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    @property
    def verify(self) -> tuple[int, int]:
        """(sequences, tokens) of the largest speculative verify pass (what compiled graphs are compiled for; (0, 0)
        without speculation): a step that drafts has at most speculative_max_batch sequences of K + 1 tokens."""
        k = self.num_speculative_tokens
        return (min(self.max_batch, self.speculative_max_batch), k + 1) if k else (0, 0)


def add_args(p: argparse.ArgumentParser) -> None:
    d = service_config.field_defaults(DecodeConfig)
    add_model_service_args(p, d, EngineConfig(model_dir=""))
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"sequences stepped together (default {d.max_batch})")
    add_checkpoint_every(p, d.checkpoint_every, "checkpoint_every")
    add_speculative_policy(p, d)


def add_speculative_policy(p: argparse.ArgumentParser, d: DecodeConfig) -> None:
    default = d.speculative_max_batch
    p.add_argument("--speculative-max-batch", type=int, default=default, metavar="N",
                   help="with --num-speculative-tokens: steps of more than N sequences draft nothing, where "
                   f"verifying drafts costs more than it saves (default {default}, from bench/spec_decode.py)")
    p.add_argument("--speculative-policy", choices=POLICIES, default=d.speculative_policy,
                   help="with --num-speculative-tokens, up to --speculative-max-batch: adaptive drafts where the "
                   "step times and the head's acceptance measured while serving say it pays (a head that drafts "
                   "poorly costs next to nothing), always at every step (default %(default)s)")


def add_checkpoint_every(p: argparse.ArgumentParser, default: int, dest: str) -> None:
    p.add_argument("--decode-checkpoint-every", type=int, default=default, dest=dest, metavar="N",
                   help="write each stream's state to the cache store every N generated tokens, so a resume after a "
                   "decode crash replays at most N tokens (default %(default)s = off: a resume replays every token "
                   "since the hand-off checkpoint, one decode step each)")


def config_from_args(args: argparse.Namespace) -> DecodeConfig:
    return model_service_from_args(DecodeConfig, args)
