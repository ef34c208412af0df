"""The checkpoint cache store: an index service (control plane, `server`) over shared-memory segments (data
plane, `shm`), and the clients prefill and decode use to hand state over (`client`).

    checkpoint.py  checkpoint bytes: safetensors + qwenpd metadata + per-tensor checksums
    index.py       entries, refcounts, leases, LRU under a byte budget (pure bookkeeping)
    allocator.py   ranges inside segments (pure bookkeeping)
    shm.py         segment files (store side) and mappings (client side)
    store.py       the three kept consistent; server.py wraps it in gRPC; config.py holds CacheStoreConfig
"""
