"""Hybrid prefix cache on the prefill side: restore the longest cached prefix, snapshot DeltaNet state at the
policy's boundaries (and where the prompt leaves the longest cached KV chain) while encoding the rest, then publish the new KV blocks and snapshots and write the
hand-off checkpoint as references to the shared blocks + the tail KV + the DeltaNet state at the prompt end.

With speculative decoding (the engine has its MTP head, `plan.drafts` runs it over the prompt: mtp.PromptDrafts),
the head's state is cached the same way: each KV block also keeps the head's KV of the positions whose next token
is in the block (PromptDrafts.block), each snapshot the hidden state just before it; a hit restores both, so a
warm request drafts from its first step as a cold one does. Such a deployment's block keys are its own (the
fingerprint does not cover the head), so blocks without the head's KV are never mixed in.

Runs on the prefill worker thread (the sync cache-store client). The prefix cache only ever saves work: a
damaged or vanished entry means recomputing, never a wrong state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from qwenpd.cache_store.checkpoint import CheckpointMeta
from qwenpd.cache_store.client import CacheStoreClient, PrefixRead, SharedItem
from qwenpd.prefill_service.prefix_policy import PrefixPolicy, block_keys
import torch

from qwenpd.engine import state_spec
from qwenpd.engine.engine import Engine
from qwenpd.engine.mtp import PromptDrafts
from qwenpd.engine.state_spec import DRAFT_HIDDEN
from qwenpd.engine.state import HybridState
from qwenpd.protos.qwenpd.v1 import cache_store_pb2 as store_pb
from qwenpd.errors import DataLoss, FailedPrecondition, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
_PIN_S = 60.0  # how long prefix entries stay leased while this request reads or references them


@dataclass(slots=True)
class PrefixPlan:
    """One prompt's view of the prefix cache: its block keys, the restored hit and the snapshots it takes."""

    token_ids: Sequence[int]
    keys: list[str]  # keys of every full block of the prompt
    cached_tokens: int = 0
    known_kv_ids: list[str] = field(default_factory=list)  # leading blocks already stored (maybe past the hit)
    lease_ids: list[str] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)  # snapshot positions still to take
    snapshots: dict[int, dict] = field(default_factory=dict)  # position -> DeltaNet tensors
    drafts: PromptDrafts | None = None  # the MTP head over the prompt (speculative decoding)

    def on_chunk(self, state: HybridState) -> None:
        """Engine callback after each prefill chunk: the engine stops exactly at every boundary."""
        if state.num_tokens in self.boundaries:
            snap = state.deltanet_tensors(for_write=True)
            if self.drafts is not None:  # the chunk's hidden states reached the head before this call
                snap[DRAFT_HIDDEN] = self.drafts.pending.cpu()
            self.snapshots[state.num_tokens] = snap


class PrefixCache:
    """max_bytes_per_request: most tensor bytes of new entries (KV blocks + snapshots) one prompt may add; a
    prompt past it is handed off without caching anything new (None = no limit). on_skip: called then, and when
    the store has no room. on_written: bytes of tensors written per request (hand-off + new entries)."""

    def __init__(self, engine: Engine, store: CacheStoreClient, policy: PrefixPolicy,
                 max_bytes_per_request: int | None = None, on_skip: Callable[[], None] | None = None,
                 on_written: Callable[[int], None] | None = None):
        self.engine = engine
        self.store = store
        self.policy = policy
        self.max_bytes_per_request = max_bytes_per_request
        self._on_skip = on_skip or (lambda: None)
        self._on_written = on_written or (lambda nbytes: None)

    def plan(self, token_ids: Sequence[int], cache_salt: str | None, drafts: PromptDrafts | None = None,
             media: Sequence[tuple[int, int, bytes]] = ()) -> PrefixPlan:
        """`media`: (start, end, content key) of the prompt's image/video tokens, mixed into the keys of the blocks
        they touch (prefill_service/media.py)."""
        b = self.policy.block_size
        # a deployment with the MTP head caches its KV in every block: its keys are its own (module doc)
        fingerprint = self.engine.fingerprint + ("+mtp" if self.engine.draft_head is not None else "")
        keys = block_keys(fingerprint, cache_salt, token_ids, b, media=media) if self.policy.enabled else []
        return PrefixPlan(token_ids, keys, drafts=drafts)

    def restore(self, plan: PrefixPlan) -> HybridState:
        """The state at the longest usable cached prefix (a fresh one on a miss); sets the plan's boundaries."""
        usable = self.policy.usable_blocks(len(plan.token_ids))
        state = None
        if self.policy.enabled and usable:
            hit = self._lookup(plan.keys[:usable])
            if hit is not None:
                plan.lease_ids = hit.lease_ids
                plan.known_kv_ids = hit.kv_ids
                if hit.blocks:
                    state = self._state_from(hit, plan.drafts)
                    if state is not None:  # a hit that does not fit the model is recomputed, all of it
                        plan.cached_tokens = hit.num_tokens
        if self.policy.enabled:
            wanted = set(self.policy.snapshot_positions(len(plan.token_ids)))
            if len(plan.known_kv_ids) > plan.cached_tokens // self.policy.block_size:
                # the cached KV chain runs past the last snapshot and stops where this prompt diverges from an
                # earlier one: the next prompt sharing that prefix will likely diverge there too, so snapshot it
                wanted.add(len(plan.known_kv_ids) * self.policy.block_size)
            plan.boundaries = sorted(p for p in wanted if p > plan.cached_tokens)
        if state is None:
            state = self.engine.new_state()
            if plan.drafts is not None:  # the head's KV goes to the state's pages
                plan.drafts.bind(state)
        else:
            state.token_ids = list(plan.token_ids[: plan.cached_tokens])
        return state

    def _lookup(self, keys: list[str]) -> PrefixRead | None:
        try:
            return self.store.lookup_prefix(self.engine.fingerprint, keys, ttl_s=_PIN_S)
        except (DataLoss, FailedPrecondition, NotFound, Unavailable) as exc:  # damaged, gone or unreachable: recompute
            log.warning("prefix cache entry unusable, recomputing: %s", exc.message)
            return None

    def _state_from(self, hit: PrefixRead, drafts: PromptDrafts | None) -> HybridState | None:
        blocks = [dict(kv) for kv in hit.kv[: hit.blocks]]
        snapshot = dict(hit.snapshot)
        head = [state_spec.split_draft(kv) for kv in blocks]
        hidden = state_spec.split_draft(snapshot).get(DRAFT_HIDDEN)
        try:
            if drafts is not None and (hidden is None or any(not h for h in head)):  # the head's state, or no hit
                raise ValueError("the cached prefix lacks the MTP head's state")
            state = self.engine.state_from_prefix(blocks, snapshot, hit.num_tokens)
        except (ValueError, KeyError, RuntimeError) as exc:
            log.warning("prefix cache hit does not fit the model, recomputing: %s", exc)
            return None
        if drafts is not None:
            try:
                kv = {name: torch.cat([h[name] for h in head], dim=1) for name in head[0]}
                drafts.restore(state, kv, hidden, hit.num_tokens)
            except (ValueError, KeyError, RuntimeError) as exc:
                log.warning("prefix cache hit does not fit the MTP head, recomputing: %s", exc)
                state.release()
                drafts.pos, drafts.pending = 0, None
                return None
        return state

    def handoff(self, plan: PrefixPlan, state: HybridState, meta: CheckpointMeta,
                handoff_ttl_s: float | None, draft: bool = False) -> str:
        """Publish new KV blocks and snapshots with the hand-off checkpoint, which references every full KV
        block of the prompt and carries only the tail KV and the DeltaNet state at the prompt end (and, with
        `draft`, the MTP head's state past the blocks: plan.drafts)."""
        b = self.policy.block_size
        known = plan.known_kv_ids

        def drafts(after: int) -> dict[str, torch.Tensor]:  # the head's state past the first `after` tokens
            return plan.drafts.tensors(after=after) if draft else {}

        try:
            if not (self.policy.enabled and plan.keys):
                return self._own_checkpoint(state, meta, handoff_ttl_s, [], drafts(0))
            new_blocks = range(len(known), len(plan.keys))
            items = [SharedItem(store_pb.ENTRY_KIND_KV_BLOCK, plan.keys[i], self._block(plan, state, i), (i + 1) * b)
                     for i in new_blocks]
            items += [SharedItem(store_pb.ENTRY_KIND_SNAPSHOT, plan.keys[pos // b - 1], snap, pos)
                      for pos, snap in sorted(plan.snapshots.items())]
            new_bytes = sum(_nbytes(it.tensors) for it in items)
            if self.max_bytes_per_request is not None and new_bytes > self.max_bytes_per_request:
                log.info("prompt would add %d bytes to the prefix cache (limit %d per request): not cached",
                         new_bytes, self.max_bytes_per_request)
                self._on_skip()
                return self._own_checkpoint(state, meta, handoff_ttl_s, known, drafts(len(known) * b))
            own = {**state.handoff_tensors(len(plan.keys) * b, for_write=True), **drafts(len(plan.keys) * b)}
            try:
                checkpoint_id = self.store.put_prefix_checkpoint(items, own, meta, known, len(new_blocks),
                                                                 handoff_ttl_s=handoff_ttl_s)
                self._on_written(new_bytes + _nbytes(own))
                return checkpoint_id
            except ResourceExhausted as exc:  # no room to cache this prompt: hand off without caching it
                log.warning("prefix cache full, handing off without caching the prompt: %s", exc.message)
                self._on_skip()
                return self._own_checkpoint(state, meta, handoff_ttl_s, known, drafts(len(known) * b))
        finally:
            self.release(plan)

    def _block(self, plan: PrefixPlan, state: HybridState, i: int) -> dict:
        """The tensors of the prompt's KV block i (with the MTP head's KV for it: PromptDrafts.block)."""
        b = self.policy.block_size
        kv = state.kv_tensors(i * b, (i + 1) * b, for_write=True)
        return kv if plan.drafts is None else {**kv, **plan.drafts.block(i * b, (i + 1) * b)}

    def own_checkpoint(self, state: HybridState, meta: CheckpointMeta, handoff_ttl_s: float | None,
                       draft: dict[str, torch.Tensor] | None = None) -> str:
        """A hand-off checkpoint holding all of the state itself (no prefix-cache references), and `draft` (the
        draft state a resumed stream's resume point carried)."""
        return self._own_checkpoint(state, meta, handoff_ttl_s, [], draft or {})

    def _own_checkpoint(self, state: HybridState, meta: CheckpointMeta, handoff_ttl_s: float | None,
                        refs: list[str], draft: dict[str, torch.Tensor]) -> str:
        own = {**state.handoff_tensors(len(refs) * self.policy.block_size, for_write=True), **draft}
        checkpoint_id = self.store.put_checkpoint(own, meta, handoff_ttl_s=handoff_ttl_s, refs=refs)
        self._on_written(_nbytes(own))
        return checkpoint_id

    def release(self, plan: PrefixPlan) -> None:
        """Drop this request's pins on prefix entries (the checkpoint's references keep what it needs)."""
        leases, plan.lease_ids = plan.lease_ids, []
        try:
            self.store.release_leases(leases)
        except NotFound:
            pass


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
