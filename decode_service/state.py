"""A leased checkpoint's tensors as a decode state, with as little copying as possible."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qwenpd.engine.engine import Engine
from qwenpd.engine.state import HybridState


def state_from_checkpoint(engine: Engine, tensors: Mapping[str, torch.Tensor], num_tokens: int,
                          max_new_tokens: int = 0, locations: dict[str, tuple[str, int]] | None = None
                          ) -> HybridState:
    """The state of a checked checkpoint (names, shapes and dtypes already verified by the reader).

    A tensor-parallel engine takes it through `Engine.state_from_tensors`: each rank reads its heads and
    channels straight from the shared-memory checkpoint where `locations` says where they are (else receives
    them from rank 0). Unsharded:

    KV is copied once, page by page, into pages of the decode engine's cache, with pages for `max_new_tokens`
    more tokens reserved at once (the scheduler promised them at admission). Conv and recurrent state stay views
    of the checkpoint's bytes: `DecodeBatch.add` copies them into the batch slot (on the device), which is their
    one copy, so the state must join a batch before the bytes are released.
    """
    if engine.tp > 1:
        return engine.state_from_tensors(dict(tensors), num_tokens, max_new_tokens, locations)
    return HybridState.from_tensors(engine.config, dict(tensors), num_tokens, engine.kv_cache, max_new_tokens,
                                    views=True)
