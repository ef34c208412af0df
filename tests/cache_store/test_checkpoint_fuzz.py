"""Property tests: the reader, fed random or mangled bytes, either returns the original tensors or raises one
of our errors (DataLoss / FailedPrecondition): never another exception, never a hang."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenpd.cache_store.checkpoint import CheckpointMeta, read_checkpoint, serialize_checkpoint
from qwenpd.errors import DataLoss, FailedPrecondition
from tests.cache_store.conftest import state_tensors

FP = "fingerprint"
GOOD = bytes(serialize_checkpoint(state_tensors(tokens=3), CheckpointMeta(FP, 3, {"k": "v"})))
EXPECTED = state_tensors(tokens=3)
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def outcome(buf: bytes) -> None:
    try:
        out, _ = read_checkpoint(buf, FP)
    except (DataLoss, FailedPrecondition):
        return
    # accepted: then it must be the original content (e.g. only header padding changed)
    assert set(out) == set(EXPECTED)
    assert all(torch.equal(out[k], v) for k, v in EXPECTED.items())


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(buf: bytes) -> None:
    outcome(buf)


@FUZZ
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255))
def test_one_byte_replaced(pos: int, value: int) -> None:
    buf = bytearray(GOOD)
    buf[pos] = value
    outcome(bytes(buf))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(GOOD)))
def test_several_bytes_replaced_and_truncated(edits: list[tuple[int, int]], keep: int) -> None:
    buf = bytearray(GOOD)
    for pos, value in edits:
        buf[pos] = value
    outcome(bytes(buf[:keep]))


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, len(GOOD)))
def test_bytes_inserted(blob: bytes, pos: int) -> None:
    outcome(GOOD[:pos] + blob + GOOD[pos:])


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "U8", "BOOL", "X"]) | _json,
                                "shape": st.lists(st.integers(-2, 2**45), max_size=4) | _json,
                                "data_offsets": st.lists(st.integers(-5, 2**64), min_size=0, max_size=3) | _json})


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _entry | _json, max_size=4),
       st.dictionaries(st.text(max_size=30), st.text(max_size=10) | _json, max_size=4) | _json,
       st.binary(max_size=256))
def test_structured_headers(table: dict, meta, data: bytes) -> None:
    header = dict(table)
    header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    outcome(len(raw).to_bytes(8, "little") + raw + data)
