"""Tensor parallelism on CPU (gloo): sharded engines against the unsharded one and against transformers."""

from __future__ import annotations

import pytest
import torch

from qwenpd.engine import DecodeBatch, Engine
from tests.hf_models import load_hf

ATOL = 1e-4

# (transformers variant, degree): KV heads split (text, tp 2) and replicated (text tp 4, conv5_tied tp 2), DeltaNet
# key heads replicated (text tp 4), tied embeddings (conv5_tied), the multimodal layout (weights under
# model.language_model.)
CASES = [("text", 2), ("text", 4), ("conv5_tied", 2), ("multimodal", 2)]


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-tp{c[1]}")
def sharded(request, hf_checkpoint):
    variant, tp = request.param
    path = hf_checkpoint(variant)
    engine = Engine(path, dtype="float32", tp=tp, threads=1)
    yield variant, path, Engine(path, dtype="float32"), engine
    engine.close()
    assert all(p.poll() is not None for p in engine.group.followers), "a rank outlived close()"


def test_logits_equal_unsharded(sharded):
    _, _, ref, eng = sharded
    assert eng.group is not None and eng.local_config.num_attention_heads < ref.config.num_attention_heads
    assert eng.group.shm is not None, "CPU ranks of one host exchange through shared memory"
    ids = _ids(37, ref.config.vocab_size, seed=1)
    a, b = ref.forward_all(ids), eng.forward_all(ids)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < ATOL


def test_greedy_equals_transformers(sharded):
    variant, path, _, eng = sharded
    hf = load_hf(path, variant)
    prompt = _ids(23, eng.config.vocab_size, seed=11)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    logits, state = eng.prefill(prompt, chunk_size=8)
    batch = DecodeBatch(eng, 2)
    batch.add(state)
    got = [int(logits.argmax())]
    while len(got) < 24:
        got.append(int(batch.step([got[-1]])[0].argmax()))
    assert got == expected


def test_state_is_canonical_across_degrees(sharded):
    """A sharded prefill's state equals the unsharded one in the full-tensor layout, and a state written at one
    degree continues exactly at the other (the hand-off contract)."""
    _, _, ref, eng = sharded
    ids = _ids(29, ref.config.vocab_size, seed=3)
    _, s_ref = ref.prefill(ids, chunk_size=10)
    _, s_tp = eng.prefill(ids, chunk_size=10)
    t_ref, t_tp = s_ref.to_tensors(), s_tp.to_tensors()
    assert t_ref.keys() == t_tp.keys()
    for name, t in t_ref.items():
        assert t_tp[name].shape == t.shape and t_tp[name].dtype == t.dtype, name
        assert (t_tp[name] - t).abs().max().item() < ATOL, name
    # a prefix (KV of some tokens + DeltaNet snapshot) and a whole state, moved both ways
    assert all(torch.allclose(a, s_ref.kv_tensors(8, 20)[n], atol=ATOL) for n, a in s_tp.kv_tensors(8, 20).items())
    into_tp = eng.state_from_tensors(t_ref, len(ids), extra_tokens=4)
    into_ref = ref.state_from_tensors(t_tp, len(ids), extra_tokens=4)
    batch_tp, batch_ref = DecodeBatch(eng, 4), DecodeBatch(ref, 4)
    batch_tp.add(into_tp)
    batch_tp.add(s_tp)
    batch_ref.add(into_ref)
    batch_ref.add(s_ref)
    for step in range(4):
        a, b = batch_ref.step([5 + step, 9]), batch_tp.step([5 + step, 9])
        assert (a - b).abs().max().item() < ATOL
    batch_tp.remove(s_tp)  # rows move on every rank alike
    a, b = batch_ref.step([1, 2])[:1], batch_tp.step([1])
    assert (batch_ref.states[0].num_tokens, into_tp.num_tokens) == (len(ids) + 5, len(ids) + 5)
    assert (a - b).abs().max().item() < ATOL


def test_ranks_write_their_slices_into_the_checkpoint(sharded, tmp_path):
    """for_write stand-ins: each rank writes its own slices into the (file-backed) checkpoint range; the leader
    only hashes. The result reads back, checksums verified, as the unsharded state; a plain buffer gathers."""
    import mmap

    from qwenpd.cache_store.checkpoint import CheckpointMeta, CheckpointWriter, read_checkpoint, serialize_checkpoint

    _, _, ref, eng = sharded
    ids = _ids(41, ref.config.vocab_size, seed=4)
    _, s_ref = ref.prefill(ids, chunk_size=16)
    _, s_tp = eng.prefill(ids, chunk_size=16)
    staged = s_tp.kv_tensors(5, 41, for_write=True)
    staged.update(s_tp.deltanet_tensors(for_write=True))
    assert not any(isinstance(t, torch.Tensor) for t in staged.values())
    want = s_ref.kv_tensors(5, 41)
    want.update(s_ref.deltanet_tensors())
    meta = CheckpointMeta(eng.fingerprint, len(ids))
    writer = CheckpointWriter(staged, meta)
    offset = 4096 + 64
    (tmp_path / "segment").write_bytes(bytes(offset + writer.nbytes))
    with open(tmp_path / "segment", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    view = memoryview(mm)[offset:offset + writer.nbytes]
    writer.write_into(view, location=(str(tmp_path), "segment", offset))
    for buf in (view, serialize_checkpoint(staged, meta)):
        got, _ = read_checkpoint(buf, eng.fingerprint)
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert got[name].dtype == t.dtype and (got[name] - t).abs().max().item() < ATOL, name
        del got
    # and back: every rank reads its own slices of the file (located tensors), the rest is scattered
    import numpy as np

    tensors, _ = read_checkpoint(view, eng.fingerprint)
    base = np.frombuffer(view, dtype=np.uint8).ctypes.data
    full = dict(tensors)
    full.update(s_ref.kv_tensors(0, 5))  # the first 5 tokens' KV were not in this checkpoint
    for name in [n for n in full if n.endswith((".k", ".v"))]:
        full[name] = torch.cat([s_ref.kv_tensors(0, 5)[name], tensors[name]], dim=1)
    located = {n: (str(tmp_path / "segment"), offset + t.data_ptr() - base) for n, t in tensors.items()
               if not n.endswith((".k", ".v"))}  # DeltaNet state from the file, K/V scattered
    loaded = eng.state_from_tensors(full, len(ids), extra_tokens=2, locations=located)
    again = ref.state_from_tensors(full, len(ids), extra_tokens=2)
    a, b = ref.decode([again], [7]), eng.decode([loaded], [7])
    assert (a - b).abs().max().item() < ATOL
    del tensors, full
    view.release()
    mm.close()
