"""Prometheus metrics of the three services (prometheus-client), one registry per service, served on
`--metrics-port` (0 = off) at http://HOST:PORT/metrics.

Every service counts its calls by method and status code (`qwenpd_requests_total`, fed by the error-mapping
interceptor in qwenpd.grpc_status). Prefill adds time-to-first-token, queue, restore, compute and hand-off write
histograms, hand-off bytes and the queue depth; decode adds time per output token, slot wait and batch size
histograms, output tokens, active sequences and queue depth; the cache store exports its bytes, entries,
leases, evictions and prefix/lease hits and misses, read on the store's event loop at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# seconds: 1 ms .. 2 min (TTFT on a long prompt), finer at the low end for per-token times
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """A service's registry and its request counter; `serve` exposes it over HTTP."""

    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter("qwenpd_requests", "gRPC calls handled, by method and final status code",
                                ["service", "method", "code"], registry=self.registry)
        self._http: Any = None

    def record(self, method: str, code: grpc.StatusCode) -> None:
        """Count one finished call (`method` is the full gRPC path, e.g. /qwenpd.v1.PrefillService/Prefill)."""
        self.requests.labels(self.service, method.rsplit("/", 1)[-1], code.name).inc()

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, buckets=_TIME_BUCKETS, registry=self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (a daemon thread) on host:port; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        log.info("%s metrics on http://%s:%d/metrics", self.service, host, server.server_port)
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class PrefillMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("prefill")
        self.ttft = self._histogram("qwenpd_prefill_ttft_seconds",
                                    "request arrival to first token sampled and hand-off checkpoint written")
        self.queue = self._histogram("qwenpd_prefill_queue_seconds", "time a request waited for the prefill worker")
        self.restore = self._histogram("qwenpd_prefill_restore_seconds", "prefix-cache lookup and state restore")
        self.compute = self._histogram("qwenpd_prefill_compute_seconds", "chunked prefill of the uncached suffix")
        self.write = self._histogram("qwenpd_handoff_write_seconds",
                                     "publishing cache entries and writing the hand-off checkpoint")
        self.handoff_bytes = Counter("qwenpd_handoff_bytes", "tensor bytes written to the cache store (hand-off "
                                     "checkpoints and new prefix-cache entries)", registry=self.registry)
        self.prompt_tokens = Counter("qwenpd_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.cached_tokens = Counter("qwenpd_cached_tokens", "prompt tokens restored from the prefix cache",
                                     registry=self.registry)
        self.queue_depth = Gauge("qwenpd_prefill_queue_depth", "requests waiting for the prefill worker",
                                 registry=self.registry)
        self.uncached = Counter("qwenpd_prefix_cache_skipped", "prompts not cached: over the per-request cache "
                                "budget or the store was full", registry=self.registry)
        self.resumes = Counter("qwenpd_prefill_resumes", "resumed streams, by where their state came from: "
                               "checkpoint (the failed decode's own state: exact) or recomputed (the prompt "
                               "prefilled again: exact when chunked as the first time)", ["source"],
                               registry=self.registry)
        self.image_tokens = Counter("qwenpd_prefill_image_tokens", "prompt tokens that stand for images and video "
                                    "frames", registry=self.registry)
        self.stored_embeddings = Counter("qwenpd_prefill_stored_embeddings", "images and videos whose embeddings "
                                         "came from an encoder instance through the cache store",
                                         registry=self.registry)


class EncoderMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("encoder")
        self.encode = self._histogram("qwenpd_encoder_seconds", "one Encode call: reading the media, the tower, "
                                      "storing the embeddings")
        self.items = Counter("qwenpd_encoder_items", "images and videos encoded, by outcome: computed, or reused "
                             "(stored before)", ["outcome"], registry=self.registry)


class DecodeMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("decode")
        self.tpot = self._histogram("qwenpd_decode_tpot_seconds", "mean time per output token of a finished stream")
        self.tokens = Counter("qwenpd_output_tokens", "tokens streamed to clients", registry=self.registry)
        self.active = Gauge("qwenpd_decode_active_sequences", "sequences in the batch", registry=self.registry)
        self.queue_depth = Gauge("qwenpd_decode_queue_depth", "sequences waiting for a batch slot",
                                 registry=self.registry)
        self.handoff_read = self._histogram("qwenpd_handoff_read_seconds",
                                            "leasing, mapping and checking a hand-off checkpoint")
        self.queue = self._histogram("qwenpd_decode_queue_seconds",
                                     "time a sequence waited for a batch slot (state load included)")
        self.batch = Histogram("qwenpd_decode_batch_size", "sequences stepped together, per step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.replayed = Counter("qwenpd_decode_replayed_tokens", "tokens of resumed streams fed again through "
                                "decode steps (already streamed before a failure)", registry=self.registry)
        self.checkpoints = Counter("qwenpd_decode_checkpoints", "decode-side resume checkpoints written",
                                   registry=self.registry)
        self.checkpoint_write = self._histogram("qwenpd_decode_checkpoint_write_seconds",
                                                "writing one decode-side resume checkpoint to the cache store")
        self.checkpoint_copy = self._histogram("qwenpd_decode_checkpoint_copy_seconds",
                                               "copying a sequence's state out for a decode-side checkpoint (on "
                                               "the stepping thread: the batch waits)")

        self.draft_tokens = Counter("qwenpd_decode_draft_tokens", "speculative decoding: MTP drafts verified",
                                    registry=self.registry)
        self.accepted = Counter("qwenpd_decode_accepted_draft_tokens", "speculative decoding: drafts accepted, by "
                                "draft position (1 = the first draft after the last token)", ["position"],
                                registry=self.registry)
        self.drafting_steps = Counter("qwenpd_decode_drafting_steps", "speculative decoding: sequence steps that "
                                      "verified drafts (each emits its accepted drafts and one more token)",
                                      registry=self.registry)
        self.accepted_length = Gauge("qwenpd_decode_mean_accepted_length", "speculative decoding: tokens emitted "
                                     "per drafting sequence step since start (1 + accepted drafts per step)",
                                     registry=self.registry)
        self.acceptance = Gauge("qwenpd_decode_draft_acceptance", "speculative decoding: the MTP head's recent "
                                "first-draft acceptance, drafted or scored while not drafting, which the adaptive "
                                "policy decides by", registry=self.registry)
        self.plain_steps = Counter("qwenpd_decode_plain_steps", "speculative decoding: steps of a batch with MTP "
                                   "heads that drafted nothing (the policy found drafting would not pay)",
                                   registry=self.registry)
        self._verified = [0, 0]  # drafting steps, accepted drafts

    def watch(self, runner: Any) -> None:
        """Read active/queued from the runner's LoadInfo at scrape time; observe its joins, steps and verify
        passes."""
        self.active.set_function(lambda: runner.load_info().active)
        self.queue_depth.set_function(lambda: runner.load_info().queued)
        runner.on_join = self.queue.observe
        runner.on_step = self.batch.observe
        runner.on_verify = self._verified_step
        for position in range(1, getattr(runner, "k", 0) + 1):
            self.accepted.labels(str(position))  # every position exported from the start, at 0
        self.accepted_length.set_function(lambda: 1 + self._verified[1] / self._verified[0] if self._verified[0]
                                          else 0.0)
        policy = getattr(runner, "policy", None)
        if policy is not None and policy.k:
            self.acceptance.set_function(lambda: policy.acceptance)
            runner.on_plain_step = self.plain_steps.inc

    def _verified_step(self, seqs: int, drafted: int, accepted_at: list[int]) -> None:
        self.draft_tokens.inc(drafted)
        self.drafting_steps.inc(seqs)
        for position, n in enumerate(accepted_at, 1):
            if n:
                self.accepted.labels(str(position)).inc(n)
        self._verified[0] += seqs
        self._verified[1] += sum(accepted_at)


class StoreMetrics(Metrics):
    """Cache store gauges and counters, taken from `Store.stats()` on the store's event loop at scrape time."""

    def __init__(self, stats: Callable[[], Any], loop: asyncio.AbstractEventLoop):
        super().__init__("cache_store")
        self.registry.register(_StoreCollector(stats, loop))


class _StoreCollector:
    def __init__(self, stats: Callable[[], Any], loop: asyncio.AbstractEventLoop):
        self._stats = stats
        self._loop = loop

    def describe(self) -> list:
        return []  # collected lazily; no describe-time call into the store

    def _snapshot(self) -> Any:
        async def take() -> Any:
            return self._stats()

        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(timeout=5.0)

    def collect(self):
        try:
            s = self._snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must not take the store down
            log.warning("cache store metrics unavailable: %s", exc)
            return
        i = s.index
        for name, doc, value in (("qwenpd_cache_used_bytes", "bytes held by entries", i.used_bytes),
                                 ("qwenpd_cache_pinned_bytes", "bytes held by leased entries", i.pinned_bytes),
                                 ("qwenpd_cache_budget_bytes", "shared-memory budget", i.budget_bytes),
                                 ("qwenpd_cache_segment_bytes", "bytes of shared-memory segments", s.segment_bytes),
                                 ("qwenpd_cache_entries", "entries (checkpoints, KV blocks, snapshots)", i.entries),
                                 ("qwenpd_cache_leases", "live leases", i.leases)):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (("qwenpd_cache_evictions", "entries evicted (LRU)", i.evictions),
                                 ("qwenpd_cache_evicted_bytes", "bytes evicted", i.evicted_bytes),
                                 ("qwenpd_cache_acquire_hits", "checkpoint leases granted", i.acquire_hits),
                                 ("qwenpd_cache_acquire_misses", "checkpoint lookups that found nothing",
                                  i.acquire_misses),
                                 ("qwenpd_cache_prefix_hits", "prefix lookups with a usable hit", s.prefix.hits),
                                 ("qwenpd_cache_prefix_misses", "prefix lookups without one", s.prefix.misses),
                                 ("qwenpd_cache_prefix_hit_tokens", "prompt tokens served from the prefix cache",
                                  s.prefix.hit_tokens)):
            yield CounterMetricFamily(name, doc, value=value)
