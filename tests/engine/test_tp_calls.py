"""The cross-rank call protocol (engine/tp/calls.py), without processes: calls are registered by name once, a
follower runs what the registry names (never an attribute looked up on the target), and a follower that cannot
stay in lockstep with the leader leaves instead of carrying on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwenpd.engine.tp import calls
from qwenpd.engine.tp.calls import Call, CallChannel, ProtocolError, cross_rank

RAN: list[str] = []


@cross_rank("test.ok")
def _ok(target, value: int) -> None:
    RAN.append(f"ok {value}")


@cross_rank("test.refuses")
def _refuses(target) -> None:
    RAN.append("refuses")
    raise ValueError("refused on every rank")


def _call(name: str, *args, previous: str | None = None) -> Call:
    return Call(name, calls.ENGINE_HANDLE, args, {}, None, (), previous)


def _follow(monkeypatch, messages: list[Call | None]) -> None:
    """Run a follower's loop over `messages` as if the leader had broadcast them."""
    queue = list(messages)

    def broadcast(message, src, group):
        message[0] = queue.pop(0)

    monkeypatch.setattr(calls.dist, "broadcast_object_list", broadcast)
    group = SimpleNamespace(rank=1, leader=False, control=None)
    CallChannel(group).follow(SimpleNamespace(mirror=None))


def test_a_name_is_registered_once():
    with pytest.raises(RuntimeError, match="registered twice"):
        cross_rank("test.ok")(lambda target: None)


def test_follower_runs_registered_calls_and_matching_failures(monkeypatch):
    RAN.clear()
    _follow(monkeypatch, [_call("test.ok", 1), _call("test.refuses"), _call("test.ok", 2, previous="ValueError"),
                          None])
    assert RAN == ["ok 1", "refuses", "ok 2"]  # the leader raised the same: still in lockstep


def test_follower_leaves_when_the_leader_ended_otherwise(monkeypatch):
    RAN.clear()
    with pytest.raises(ProtocolError, match="test.refuses ended ValueError on rank 1 but normally on the leader"):
        _follow(monkeypatch, [_call("test.refuses"), _call("test.ok", 1, previous=None), None])
    assert RAN == ["refuses"]  # nothing more runs on a rank out of step
    with pytest.raises(ProtocolError, match="ended normally on rank 1 but ValueError on the leader"):
        _follow(monkeypatch, [_call("test.ok", 1), _call("test.ok", 2, previous="ValueError"), None])


def test_an_unknown_call_is_a_protocol_error_not_an_attribute(monkeypatch):
    with pytest.raises(ProtocolError, match="unknown cross-rank call 'engine.no_such_call'"):
        _follow(monkeypatch, [_call("engine.no_such_call"), None])


def test_every_call_the_engine_makes_is_registered():
    """The engine's cross-rank methods are in the registry under the names they send (imported with it)."""
    from qwenpd.engine.engine import DecodeBatch, Engine
    from qwenpd.engine.state import HybridState
    from qwenpd.engine.tp.state_io import StagedState

    methods = [m for cls in (Engine, DecodeBatch, HybridState, StagedState) for m in vars(cls).values()
               if hasattr(m, "cross_rank")]
    assert len(methods) >= 14
    assert all(calls._CALLS[m.cross_rank] is m.__wrapped__ for m in methods)
    assert {"state.gather", "state.stage", "engine.decode_batch"} <= set(calls._CALLS)


def test_staged_state_is_what_the_cache_store_writes_through():
    """The typed seam between the engine and the cache store: staged slices are the checkpoint writer's
    RankWritten values and their owner a SliceOwner (cache_store/checkpoint.py)."""
    import torch

    from qwenpd.cache_store.checkpoint import RankWritten, SliceOwner
    from qwenpd.engine.config import preset
    from qwenpd.engine.state_spec import shapes
    from qwenpd.engine.tp.plan import ShardPlan
    from qwenpd.engine.tp.state_io import StagedState

    config = preset("tiny")
    plan = ShardPlan(config, 2, 0)
    local = {n: torch.zeros(s) for n, s in shapes(plan.local_config, 3).items()}
    staged = StagedState(SimpleNamespace(plan=lambda: plan), local)
    tensors = staged.tensors()
    assert isinstance(staged, SliceOwner)
    assert all(isinstance(t, RankWritten) for t in tensors.values())
    assert {n: t.shape for n, t in tensors.items()} == shapes(config, 3)  # canonical shapes on the leader
