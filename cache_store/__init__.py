"""The checkpoint cache store: the service that holds the model state handed from prefill to decode, and the
hybrid prefix cache (shared GQA KV blocks + DeltaNet snapshots under prefix keys). It owns the index (control
plane, small unary RPCs); the bytes live in a data plane chosen with `--backend`: same-host shared memory
(`shm`) or Mooncake Store across hosts (`mooncake`), and never travel in its RPCs.

Store side:
    server.py      the CacheStore gRPC service; config.py its CacheStoreConfig and flags; __main__.py an entry point
    store.py       the index and a space kept consistent (allocate, commit, lease, release, evict, reclaim)
    index.py       entries, prefix keys, refcounts, leases, LRU under a byte budget (plain bookkeeping)
    allocator.py   ranges inside pooled segments (plain bookkeeping)
    space.py       where an entry's bytes live: ShmSpace (shm.py segments) or MooncakeSpace (mooncake.py)
    mooncake_master.py  a local mooncake_master child for `serve all --backend mooncake` and tests
Both sides:
    checkpoint.py  the checkpoint bytes: safetensors + qwenpd metadata + per-tensor xxh3 checksums
Client side (used by prefill and decode):
    client.py      the control-plane client: AsyncCacheStoreClient and its blocking wrapper CacheStoreClient
    data_plane.py  writing and reading checkpoint bytes over shm mappings or Mooncake batch put/get
"""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
