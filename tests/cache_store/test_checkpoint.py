"""Checkpoint bytes: round trips, safetensors compatibility, and loud refusal of anything that does not match."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

from qwenpd.cache_store import checkpoint as ck
from qwenpd.cache_store.checkpoint import CheckpointMeta, read_checkpoint, serialize_checkpoint, write_checkpoint
from qwenpd.errors import DataLoss, FailedPrecondition
from tests.cache_store.conftest import STATE_DTYPES, state_shapes, state_tensors

FP = "f" * 64


def make(tensors=None, tokens: int = 7, extra=None) -> bytearray:
    return serialize_checkpoint(tensors if tensors is not None else state_tensors(tokens=tokens),
                                CheckpointMeta(FP, tokens, extra or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
                                   torch.bool], ids=str)
def test_round_trip_dtypes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    t = {"a": (torch.randn(3, 5, generator=g) * 10).to(dtype), "scalar": torch.tensor(2.5).to(dtype),
         "empty": torch.zeros(0, 4, dtype=dtype)}
    out, meta = read_checkpoint(make(t, tokens=3, extra={"qwenpd.handoff": '{"x": 1}'}), FP)
    assert meta == CheckpointMeta(FP, 3, {"qwenpd.handoff": '{"x": 1}'})
    assert set(out) == set(t)
    for name, want in t.items():
        assert out[name].dtype == want.dtype and out[name].shape == want.shape
        assert torch.equal(out[name], want), name


def test_state_round_trip_with_expected_shapes_as_function_of_tokens() -> None:
    t = state_tensors(tokens=11)
    out, meta = read_checkpoint(make(t, tokens=11), FP, state_shapes, STATE_DTYPES)
    assert meta.num_tokens == 11
    assert all(torch.equal(out[k], v) for k, v in t.items())


def test_safetensors_reads_our_bytes(tmp_path) -> None:
    t = state_tensors()
    buf = make(t, extra={"note": "hi"})
    loaded = safetensors.torch.load(bytes(buf))
    assert all(torch.equal(loaded[k], v) for k, v in t.items())
    path = tmp_path / "x.safetensors"
    path.write_bytes(buf)
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()[ck.K_FINGERPRINT] == FP and f.metadata()["note"] == "hi"
        assert torch.equal(f.get_tensor("layers.0.recurrent"), t["layers.0.recurrent"])


def test_reads_are_zero_copy_and_aligned() -> None:
    buf = make()
    out, _ = read_checkpoint(buf, FP)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    data_start = 8 + int.from_bytes(buf[:8], "little")
    assert data_start % ck.DATA_ALIGN == 0
    for t in out.values():
        assert base <= t.data_ptr() < base + len(buf)
        assert (t.data_ptr() - base) % t.element_size() == 0


def test_large_multi_chunk_bytes_do_not_depend_on_thread_count() -> None:
    g = torch.Generator().manual_seed(2)
    t = {"big": torch.randn(3 * ck.HASH_CHUNK // 4 + 123, generator=g), "b16": torch.randn(5000, generator=g).bfloat16()}
    meta = CheckpointMeta(FP, 1)
    one, four = (ck.CheckpointWriter(t, meta, threads=n) for n in (1, 4))
    a, b = bytearray(one.nbytes), bytearray(four.nbytes)
    one.write_into(a)
    four.write_into(b)
    assert a == b
    out, _ = read_checkpoint(b, FP, threads=4)
    assert torch.equal(out["big"], t["big"]) and torch.equal(out["b16"], t["b16"])


def test_writes_non_contiguous_tensors_and_into_a_larger_buffer() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    view = base[:, ::2]  # non-contiguous
    writer = ck.plan_checkpoint({"v": view}, CheckpointMeta(FP, 0))
    buf = bytearray(writer.nbytes + 100)
    assert write_checkpoint({"v": view}, CheckpointMeta(FP, 0), buf) == writer.nbytes
    out, _ = read_checkpoint(memoryview(buf)[:writer.nbytes], FP)
    assert torch.equal(out["v"], view)


def test_writer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="reserved prefix"):
        CheckpointMeta(FP, 1, {"qwenpd.ckpt.format": "2"})
    with pytest.raises(ValueError):
        CheckpointMeta("", 1)
    with pytest.raises(ValueError, match="cannot be stored"):
        ck.plan_checkpoint({"c": torch.zeros(2, dtype=torch.complex64)}, CheckpointMeta(FP, 1))
    writer = ck.plan_checkpoint(state_tensors(), CheckpointMeta(FP, 7))
    with pytest.raises(ValueError, match="needs"):
        writer.write_into(bytearray(writer.nbytes - 1))
    with pytest.raises(ValueError, match="read-only"):
        writer.write_into(bytes(writer.nbytes))


# ---- refusals -------------------------------------------------------------------------------------------------
def test_wrong_fingerprint_is_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="written for model") as e:
        read_checkpoint(make(), "0" * 64)
    assert e.value.reason == "MODEL_MISMATCH"


@pytest.mark.parametrize("case", ["shape", "dtype", "missing", "unexpected"])
def test_state_mismatch_is_failed_precondition(case: str) -> None:
    shapes = dict(state_shapes(7))
    dtypes = dict(STATE_DTYPES)
    if case == "shape":
        shapes["layers.3.k"] = (2, 8, 16)
    elif case == "dtype":
        dtypes["layers.0.recurrent"] = torch.bfloat16
    elif case == "missing":
        shapes["layers.7.k"] = (2, 7, 16)
    else:
        del dtypes["layers.0.conv"]
    with pytest.raises(FailedPrecondition) as e:
        read_checkpoint(make(), FP, shapes, dtypes)
    assert e.value.reason == "STATE_MISMATCH"


def _rewrite_meta(buf: bytearray, **changes: str) -> bytearray:
    """A checkpoint whose metadata was changed by someone who also fixed the header checksum."""
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(bytes(buf[8:8 + n]))
    header["__metadata__"].update(changes)
    header["__metadata__"][ck.K_HEADER_CHECKSUM] = f"{ck._header_digest(header):016x}"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    return bytearray(buf[:8] + raw + buf[8 + n:])


def test_unknown_format_version_is_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="format"):
        read_checkpoint(_rewrite_meta(make(), **{ck.K_FORMAT: "2"}), FP)


def test_edited_metadata_without_fixing_the_checksum_is_data_loss() -> None:
    buf = make()
    i = buf.index(FP.encode())
    buf[i] = ord("e")
    with pytest.raises(DataLoss, match="header checksum"):
        read_checkpoint(buf, "e" + FP[1:])


def test_every_flipped_byte_is_detected() -> None:
    good = make(tokens=2)
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        with pytest.raises((DataLoss, FailedPrecondition)):
            read_checkpoint(bad, FP)


def test_flipped_data_byte_names_the_tensor() -> None:
    buf = make()
    buf[-1] ^= 0x01
    with pytest.raises(DataLoss, match="corrupt") as e:
        read_checkpoint(buf, FP)
    assert e.value.reason == "CHECKSUM_MISMATCH"


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1, -100])
def test_truncated_buffer_is_data_loss(cut: int) -> None:
    good = make()
    with pytest.raises(DataLoss):
        read_checkpoint(good[:cut], FP)


def test_trailing_garbage_is_data_loss() -> None:
    with pytest.raises(DataLoss, match="truncated or corrupt"):
        read_checkpoint(make() + b"\0" * 8, FP)


def test_plain_safetensors_file_is_not_a_checkpoint() -> None:
    raw = safetensors.torch.save({"a": torch.zeros(2)})
    with pytest.raises(DataLoss, match="not a qwenpd checkpoint"):
        read_checkpoint(raw, FP)


def test_an_optional_group_is_all_there_or_absent() -> None:
    """The hand-off's draft state (state_spec.Expected's optional names): a checkpoint may carry all of it or none;
    part of it, or any of it misshaped, is FAILED_PRECONDITION."""
    from qwenpd.engine.state_spec import Expected

    def draft(tokens: int) -> dict[str, tuple[int, ...]]:
        return {"mtp.0.k": (2, tokens - 1, 16), "mtp.hidden": (32,)}

    def shapes(n: int) -> Expected:
        return Expected(state_shapes(n), draft(n))

    dtypes = Expected(STATE_DTYPES, {"mtp.0.k": torch.bfloat16, "mtp.hidden": torch.bfloat16})
    state = state_tensors(tokens=9)
    with_draft = {**state, "mtp.0.k": torch.zeros(2, 8, 16, dtype=torch.bfloat16),
                  "mtp.hidden": torch.zeros(32, dtype=torch.bfloat16)}
    for tensors in (state, with_draft):
        out, _ = read_checkpoint(make(tensors, tokens=9), FP, shapes, dtypes)
        assert set(out) == set(tensors)
    partial = {**state, "mtp.hidden": torch.zeros(32, dtype=torch.bfloat16)}
    with pytest.raises(FailedPrecondition, match="missing"):
        read_checkpoint(make(partial, tokens=9), FP, shapes, dtypes)
    misshaped = {**with_draft, "mtp.0.k": torch.zeros(2, 9, 16, dtype=torch.bfloat16)}
    with pytest.raises(FailedPrecondition, match="mtp.0.k"):
        read_checkpoint(make(misshaped, tokens=9), FP, shapes, dtypes)
