"""The paged KV cache: page bookkeeping (plain Python), the engine's pages per sequence, a fixed-size cache that
refuses, pages coming back, the checkpoint boundary (full K/V tensors) and decode admission by pages."""

from __future__ import annotations

import gc

import pytest
import torch

from qwenpd.decode_service.scheduler import Scheduler
from qwenpd.engine import DecodeBatch, Engine
from qwenpd.engine.pages import NULL_PAGE, OutOfPages, PageAllocator, PageBudget, pages_for
from qwenpd.engine.kv_cache import page_bytes
from qwenpd.errors import ResourceExhausted


def test_allocator_never_hands_out_the_null_page_and_reuses_freed_pages():
    a = PageAllocator(5)
    got = a.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and NULL_PAGE not in got and a.free == 0
    with pytest.raises(OutOfPages):
        a.allocate(1)
    a.release(got[1:3])
    assert sorted(a.allocate(2)) == sorted(got[1:3])
    a.grow(8)
    assert sorted(a.allocate(3)) == [5, 6, 7]
    assert pages_for(0, 4) == 0 and pages_for(1, 4) == 1 and pages_for(8, 4) == 2 and pages_for(9, 4) == 3


def test_budget_promises_whole_lengths():
    b = PageBudget(10)
    b.reserve(6)
    assert b.fits(4) and not b.fits(5)
    with pytest.raises(OutOfPages):
        b.reserve(5)
    b.release(6)
    assert b.fits(10)
    assert PageBudget(None).fits(10**9)


class Seq:
    pass


def test_scheduler_admits_only_when_pages_are_free():
    s: Scheduler[Seq] = Scheduler(max_batch=4, max_queued=4)
    s.pages = PageBudget(10)
    a, b = Seq(), Seq()
    s.submit(a, pages=6)
    with pytest.raises(ResourceExhausted) as full:
        s.submit(b, pages=5)
    assert full.value.retry_after_s == 0.1 and "KV cache is full" in str(full.value)
    with pytest.raises(ResourceExhausted) as never:
        s.check_room(pages=11)
    assert never.value.retry_after_s is None  # it would never fit: retrying does not help
    s.submit(b, pages=4)
    s.cancel(b)  # leaving the waiting line gives its pages back
    s.next_round(idle=False)
    s.finish(a)  # so does finishing
    s.check_room(pages=10)


def test_sequences_own_pages_and_give_them_back(tiny_model_dir):
    c_bytes = 40 * page_bytes(Engine(tiny_model_dir).config, 8, torch.float32)
    eng = Engine(tiny_model_dir, dtype="float32", kv_cache_bytes=c_bytes, page_size=8)
    alloc = eng.kv_cache.allocator
    assert alloc.num_pages == 40 and alloc.free == 39
    _, a = eng.prefill(list(range(1, 21)))
    assert len(a.kv.pages) == 3 and alloc.free == 36
    _, b = eng.prefill(list(range(1, 9)))
    assert set(a.kv.pages).isdisjoint(b.kv.pages)
    a.release()
    assert alloc.free == 38
    del b
    gc.collect()
    assert alloc.free == 39
    with pytest.raises(OutOfPages):
        eng.prefill(list(range(1, 8 * 39 + 2)))


def test_paged_state_round_trips_through_checkpoint_tensors(tiny_model_dir):
    """to_tensors gives full K/V per layer (the wire format); a state rebuilt from them on another page size
    decodes exactly like the original."""
    eng = Engine(tiny_model_dir, dtype="float32", page_size=8)
    other = Engine(tiny_model_dir, dtype="float32", page_size=3)
    ids = torch.randint(1, 500, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    _, state = eng.prefill(ids, chunk_size=16)
    tensors = state.to_tensors()
    k = tensors[f"layers.{eng.config.attention_layers[0]}.k"]
    assert k.shape == (eng.config.num_key_value_heads, 45, eng.config.head_dim)
    copy = other.state_from_tensors(tensors, 45)
    assert all(torch.equal(copy.to_tensors()[n], t) for n, t in tensors.items())
    steps = []
    for engine, st in ((eng, state), (other, copy)):
        batch = DecodeBatch(engine, 2)
        batch.add(st)
        steps.append(torch.stack([batch.step([7])[0], batch.step([8])[0]]))
    assert torch.allclose(steps[0], steps[1], atol=1e-5, rtol=0)
