"""The decode service: checkpoint in, token stream out, with continuous batching.

    service.py    the DecodeService servicer: lease and check a checkpoint, stream tokens, cancel, GetLoad
    runner.py     the one stepping thread that owns the engine and steps every active sequence together
    scheduler.py  admission and batch membership (plain bookkeeping, no tensors, no gRPC)
    state.py      a leased checkpoint's tensors as a decode state
    server.py     start-up (qwenpd.grpc_server.run_server); config.py its DecodeConfig and flags

It reads the hand-off record prefill wrote (`qwenpd.handoff`); it never imports the prefill service.
"""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
