"""The encoder pool (E of E/P/D): a multimodal checkpoint's vision tower as a service of its own, its output handed
to prefill through the cache store. `qwenpd serve encoder`, or `qwenpd serve all --encoders N`; the gateway routes
image prompts to it (`--encoders`).

    service.py   the EncoderService servicer: read the media, run the tower on one worker thread, store embeddings
    server.py    start-up (qwenpd.grpc_server.run_server); config.py its EncoderConfig and flags

How media are read and keyed is the shared contract `qwenpd.media`; it never imports the prefill service.
"""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
