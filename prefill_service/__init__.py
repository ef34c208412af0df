"""The prefill service: prompt in, checkpoint handle out. Encodes the prompt in chunks, samples the first token
and writes the hand-off checkpoint (the state after ALL prompt tokens) through the cache store.

    service.py        the PrefillService servicer (validation on the event loop, encoding on the worker)
    queue.py          the bounded FIFO in front of the one worker thread (plain bookkeeping)
    prompt.py         a request's prompt (text, token ids or chat) as validated token ids
    media.py          a prompt's images: placement, content keys, the encoder cache, stored embeddings
    prefix.py         the hybrid prefix cache on the prefill side: restore, snapshot, publish
    prefix_policy.py  block keys and where DeltaNet snapshots are taken (plain Python)
    resume.py         continuing a stream whose decode died (PrefillRequest.resume_generated)
    server.py         start-up (qwenpd.grpc_server.run_server); config.py its PrefillConfig and flags

The hand-off record it writes is the shared contract `qwenpd.handoff`; it never imports the decode service. How
an image is read and keyed is shared with the encoder pool through `qwenpd.media`.
"""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
