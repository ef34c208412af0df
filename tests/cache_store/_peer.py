"""A separate client process for the service tests:

    python -m tests.cache_store._peer put ADDRESS SEED TOKENS      -> prints the checkpoint id and a digest
    python -m tests.cache_store._peer get ADDRESS ID SEED TOKENS   -> prints "equal" or "different" and a digest
"""

from __future__ import annotations

import hashlib
import sys

import torch

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient
from tests.cache_store.conftest import STATE_DTYPES, state_shapes, state_tensors

FINGERPRINT = "peer-fingerprint"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    mode, address = argv[0], argv[1]
    with CacheStoreClient(address) as client:
        if mode == "put":
            seed, tokens = int(argv[2]), int(argv[3])
            tensors = state_tensors(seed, tokens)
            cid = client.put_checkpoint(tensors, CheckpointMeta(FINGERPRINT, tokens, {"seed": str(seed)}))
            print(cid, digest(tensors), flush=True)
        else:
            cid, seed, tokens = argv[2], int(argv[3]), int(argv[4])
            with client.checkpoint(cid, FINGERPRINT, state_shapes, STATE_DTYPES, delete=True) as ckpt:
                want = state_tensors(seed, tokens)
                same = ckpt.metadata == {"seed": str(seed)} and ckpt.num_tokens == tokens and \
                    all(torch.equal(ckpt.tensors[k], v) for k, v in want.items())
                print("equal" if same else "different", digest(ckpt.tensors), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
