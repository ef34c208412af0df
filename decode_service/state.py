"""A leased checkpoint's tensors as a decode state, with as little copying as possible."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qwenpd.engine.config import ModelConfig
from qwenpd.engine.state import HybridState

EXTRA_CAPACITY = 64  # KV room for generated tokens before the first regrowth


def state_from_checkpoint(config: ModelConfig, tensors: Mapping[str, torch.Tensor], num_tokens: int,
                          dtype: torch.dtype, device: torch.device | str = "cpu") -> HybridState:
    """The state of a checked checkpoint (names, shapes and dtypes already verified by the reader).

    KV is copied once into fresh buffers with room to grow (no zero fill: positions past num_tokens are never
    read). Conv and recurrent state stay views of the checkpoint's bytes: `DecodeBatch.add` copies them into
    the batch slot, which is their one copy, so the state must join a batch before the bytes are released.
    """
    cap = num_tokens + EXTRA_CAPACITY
    keys, values = [], []
    for layer in config.attention_layers:
        for out, kind in ((keys, "k"), (values, "v")):
            src = tensors[f"layers.{layer}.{kind}"]  # [Hkv, T, D]
            buf = torch.empty(src.shape[0], cap, src.shape[2], dtype=dtype, device=device)
            buf[:, :num_tokens].copy_(src)
            out.append(buf)
    conv = [tensors[f"layers.{layer}.conv"] for layer in config.linear_layers]
    recurrent = [tensors[f"layers.{layer}.recurrent"] for layer in config.linear_layers]
    return HybridState(config, num_tokens, keys, values, conv, recurrent)
