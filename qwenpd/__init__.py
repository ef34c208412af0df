"""qwenpd: disaggregated prefill/decode serving of the Qwen3.5 / Qwen3.6 hybrid models.

Every part installs under this one namespace (setup.py maps the repository's top-level folders here):

    qwenpd.kernels          math: gated delta rule, causal conv1d, NKI kernels (imports nothing of ours)
    qwenpd.engine           the model, state, sampling, tokenizer (imports kernels)
    qwenpd.protos           the gRPC contract and its generated code
    qwenpd.cache_store      the checkpoint cache store service and its clients (no service, no engine)
    qwenpd.prefill_service  chunked prompt encoding, the prefix cache (engine, cache_store)
    qwenpd.decode_service   continuous-batching generation (engine, cache_store; never prefill_service)
    qwenpd.clients          the Python client library (protos and the shared modules only)
Shared modules here: errors (plain domain errors), grpc_status (their one mapping to gRPC statuses),
grpc_server (server skeleton and start-up), address, security, limits, metrics, service_config, handoff (the
prefill -> decode contract). Entry points: cli (the `qwenpd` command), serve (its serving commands) and
supervisor (`serve all`'s child processes). docs/design.md is the design map; tests/test_structure.py
enforces the import directions.
"""
