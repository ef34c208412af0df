"""Shared fixtures: tiny checkpoints built here (no downloads) — our own init-model and transformers' save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# one thread per test process: services under test run in their own processes beside it on 2 cores
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The service suites first (stable otherwise): they are most of the suite's time, and .ci/run spreads test
    files over workers in collection order, so one collected last can leave a worker running it alone at the end
    while the other core idles."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/services/"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default: `qwenpd init-model --preset tiny` (fp32 weights, real BPE tokenizer)."""
    from qwenpd.engine.init_model import init_model

    return init_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """The in-process engine on the tiny model: the reference for the service suites, and what unit tests that
    need a real tokenizer or EOS ids use."""
    from qwenpd.engine import Engine

    return Engine(tiny_model_dir)


@pytest.fixture(scope="session")
def spec_engine(tiny_model_dir):
    """`engine` with speculative decoding's MTP head (Engine.draft_head) and its KV layers in the paged cache."""
    from qwenpd.engine import Engine

    return Engine(tiny_model_dir, speculative=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: save a random transformers Qwen3.5 model with the given config overrides; cached per variant."""
    from tests.hf_models import save_hf_checkpoint

    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = save_hf_checkpoint(tmp_path_factory.mktemp(variant) / "ckpt", variant)
        return cache[variant]

    return make
