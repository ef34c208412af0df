"""Prefix-cache planning, pure Python: block keys of a prompt and where DeltaNet snapshots are taken.

A prompt is cut into blocks of `block_size` tokens. Block i's key is a hash of block i-1's key and block i's
tokens, and the chain starts from a seed of the model fingerprint and the request's cache salt, so a key names
a whole prefix of one model for one tenant (the salt itself never leaves the prefill service). GQA KV is
stored per block; DeltaNet conv + recurrent state is snapshotted only at some block boundaries, since one
snapshot costs as much as thousands of tokens of KV (see docs/design.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 256  # tokens per KV block
DEFAULT_SNAPSHOT_INTERVAL = 2048  # tokens between periodic DeltaNet snapshots


@dataclass(slots=True, frozen=True)
class PrefixPolicy:
    """block_size: tokens per KV block; snapshot_interval: a snapshot every this many tokens (a multiple of
    block_size; 0 = only the last boundary inside each prompt)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    snapshot_interval: int = DEFAULT_SNAPSHOT_INTERVAL
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.snapshot_interval < 0 or self.snapshot_interval % self.block_size:
            raise ValueError(f"snapshot_interval must be a non-negative multiple of block_size "
                             f"({self.block_size}), got {self.snapshot_interval}")

    def usable_blocks(self, num_tokens: int) -> int:
        """Full blocks strictly inside a prompt: a cached prefix must leave at least one token to compute,
        since the first generated token is sampled from the last prompt token's logits."""
        return (num_tokens - 1) // self.block_size if num_tokens > 0 else 0

    def snapshot_positions(self, num_tokens: int) -> list[int]:
        """Absolute token positions (block boundaries) where this prompt's prefill snapshots DeltaNet state:
        every snapshot_interval tokens, and the last block boundary strictly inside the prompt."""
        last = self.usable_blocks(num_tokens) * self.block_size
        if last == 0:
            return []
        every = list(range(self.snapshot_interval, last, self.snapshot_interval)) if self.snapshot_interval else []
        return every + [last]


def chain_seed(fingerprint: str, cache_salt: str | None) -> bytes:
    h = hashlib.sha256(b"qwenpd-prefix-v1\0" + fingerprint.encode() + b"\0")
    if cache_salt:
        h.update(b"salt\0" + cache_salt.encode())
    return h.digest()


def block_keys(fingerprint: str, cache_salt: str | None, token_ids: Sequence[int], block_size: int,
               num_blocks: int | None = None, media: Sequence[tuple[int, int, bytes]] = ()) -> list[str]:
    """Hex keys of the first `num_blocks` full blocks (default: all full blocks) of `token_ids`. `media`:
    (start, end, content key) of image/video token runs; a block they touch has their key and where the block
    cuts them in its own key (the same placeholder tokens stand for different pictures)."""
    n = len(token_ids) // block_size if num_blocks is None else num_blocks
    tokens = np.asarray(token_ids[: n * block_size], dtype="<i4")
    keys, prev = [], chain_seed(fingerprint, cache_salt)
    for i in range(n):
        lo, hi = i * block_size, (i + 1) * block_size
        mixed = b"".join(key + max(lo, a).to_bytes(8, "little") + min(hi, b).to_bytes(8, "little")
                         for a, b, key in media if a < hi and b > lo)
        prev = hashlib.sha256(prev + tokens[lo:hi].tobytes() + mixed).digest()
        keys.append(prev.hex())
    return keys
