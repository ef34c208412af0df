"""State across the ranks of a tensor-parallel group, always in the canonical full-tensor layout
(engine/state_spec.py), each rank sending or receiving only its own slices (plan.py's `state_ranges`):

    gather_state / scatter_state   through the control group, to and from the leader
    read_state                     each rank reads its rows straight from a shared-memory checkpoint
    export                         a sequence state's tensors: gathered to the leader, or staged on every rank
    StagedState / StagedTensor     slices kept on each rank until each writes them into a shared checkpoint
                                   itself (the cache store's RankWritten values) or they are gathered once
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qwenpd.engine import state_spec
from qwenpd.engine.tp.calls import adopt, cross_rank
from qwenpd.engine.tp.group import TPGroup
from qwenpd.engine.tp.plan import merge_state, plans, take

LocalSpecs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # name -> this rank's shape and dtype


def gather_state(group: TPGroup, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every rank's `local` state slices -> canonical tensors on the leader (None elsewhere)."""
    names = sorted(local)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(group.degree)]
    for name in names:
        t = local[name].contiguous()
        pieces = [torch.empty_like(t) for _ in range(group.degree)] if group.leader else None
        group.transfer(dist.gather, t, pieces, dst=0, group=group.control)
        if group.leader:
            for r, piece in enumerate(pieces):
                shards[r][name] = piece
    if not group.leader:
        return None
    like = {name: torch.empty(state_spec.canonical_shape(group.config, name, local[name].shape),
                              dtype=local[name].dtype) for name in names}
    return merge_state(shards, plans(group.config, group.degree), like)


def scatter_state(group: TPGroup, canonical: Mapping[str, torch.Tensor] | None,
                  local_specs: LocalSpecs) -> dict[str, torch.Tensor]:
    """The leader's canonical tensors -> each rank's slices (this rank's returned)."""
    group_plans = plans(group.config, group.degree)
    out = {}
    for name in sorted(local_specs):
        shape, dtype = local_specs[name]
        piece = torch.empty(shape, dtype=dtype)
        pieces = None
        if group.leader:
            assert canonical is not None
            pieces = [take(canonical[name], p.state_ranges(name)) for p in group_plans]
        group.transfer(dist.scatter, piece, pieces, src=0, group=group.control)
        out[name] = piece
    return out


def read_state(group: TPGroup, located: Mapping[str, tuple[str, int]], local_specs: LocalSpecs
               ) -> dict[str, torch.Tensor]:
    """This rank's slices of canonical state tensors that lie in shared-memory files (`located`: file, byte
    offset of the tensor's data), read straight from there: dim-0 rows of the canonical layout."""
    plan = group.plan()
    out = {}
    for name, (path, offset) in sorted(located.items()):
        shape, dtype = local_specs[name]
        itemsize = dtype.itemsize
        row = math.prod(shape[1:]) * itemsize
        data = _mapped(path)
        pieces = [data[offset + start * row: offset + stop * row] for _, start, stop in plan.state_ranges(name)]
        raw = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one range: a view, copied once by the caller
        if raw.numel() != math.prod(shape) * itemsize:
            raise RuntimeError(f"{name} lies outside {path}")
        out[name] = raw.view(dtype).view(shape)
    return out


def receive_state(group: TPGroup, local_config, tensors: Mapping[str, torch.Tensor] | None, num_tokens: int,
                  model_dtype: torch.dtype, located: Mapping[str, tuple[str, int]]) -> dict[str, torch.Tensor]:
    """This rank's slices of a state given as canonical tensors on the leader: read where `located` says they lie
    in shared memory, the rest scattered from the leader."""
    specs = {name: (shape, state_spec.dtype_of(name, model_dtype))
             for name, shape in state_spec.shapes(local_config, num_tokens).items()}
    direct = read_state(group, located, {n: s for n, s in specs.items() if n in located})
    rest = None if tensors is None else {n: t for n, t in tensors.items() if n not in located}
    return {**direct, **scatter_state(group, rest, {n: s for n, s in specs.items() if n not in located})}


_MAPS: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}  # this process's read_state file mappings


def _mapped(path: str) -> torch.Tensor:
    """`path` mapped read-only, kept across calls (mapping anew would fault in every page again); remapped when the
    file at `path` is another one (same name, new inode: a restarted store)."""
    st = os.stat(path)
    held = _MAPS.get(path)
    if held is not None and held[0] == (st.st_dev, st.st_ino, st.st_size):
        return held[1]
    for gone in [p for p in _MAPS if p == path or not os.path.exists(p)]:
        _MAPS.pop(gone)  # the mapping goes with the last view of it
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():  # read-only memory: nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mm, dtype=torch.uint8)
    _MAPS[path] = ((st.st_dev, st.st_ino, st.st_size), data)
    return data


# ---- a sequence state's tensors ------------------------------------------------------------------------------
def export(state: Any, piece: Any, for_write: bool) -> dict[str, Any] | None:
    """`state.local_tensors(piece)` of every rank as canonical tensors on the leader (None on the others); with
    `for_write`, StagedTensor stand-ins instead, whose slices each rank keeps (StagedState)."""
    return _stage(state, piece) if for_write else _gather(state, piece)


@cross_rank("state.gather")
def _gather(state: Any, piece: Any) -> dict[str, torch.Tensor] | None:
    return gather_state(state.mirror.group, state.local_tensors(piece))


@cross_rank("state.stage", creates=True)
def _stage(state: Any, piece: Any) -> dict[str, Any] | None:
    group = state.mirror.group
    staged = adopt(state, StagedState(group, state.local_tensors(piece)))
    return staged.tensors() if group.leader else None


class StagedState:
    """Each rank's slices of some state tensors, copied at one moment (KV blocks, a DeltaNet snapshot, a hand-off)
    and kept on that rank until they are written into a shared checkpoint or dropped: every rank writes its own
    slice straight into the shared-memory checkpoint (no gather through rank 0)."""

    def __init__(self, group: TPGroup, local: dict[str, torch.Tensor]):
        self.local = local
        self.mirror = None
        self._plan = group.plan()
        self._joined: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, "StagedTensor"]:
        """The leader's stand-ins for the canonical tensors (CheckpointWriter writes them through us)."""
        config = self._plan.config
        return {name: StagedTensor(self, name, state_spec.canonical_shape(config, name, t.shape), t.dtype)
                for name, t in self.local.items()}

    def write_slices(self, location: tuple[str, str, int], placements: list[tuple["StagedTensor", int]]) -> None:
        """Every rank writes its slices of the placed tensors into the file range `location` (directory, file,
        offset; each tensor at its offset in the range); returns when all have landed (or raises on every rank
        if one failed)."""
        self._write(location, [(t.name, offset) for t, offset in placements])

    @cross_rank("staged.write")
    def _write(self, location: tuple[str, str, int], placements: list[tuple[str, int]]) -> None:
        directory, name, base = location
        error = None
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                for tensor_name, offset in placements:
                    local = self.local[tensor_name].contiguous()
                    row = local[0].numel() * local.element_size()  # slices are whole rows of dim 0
                    raw = local.view(-1).view(torch.uint8)
                    for (dim, start, stop), local_row in self._plan.write_ranges(tensor_name):
                        assert dim == 0, "state slices run along dim 0"
                        os.pwrite(fd, raw[local_row * row: (local_row + stop - start) * row].numpy(),
                                  base + offset + start * row)
            finally:
                os.close(fd)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
        if not self.mirror.group.agree_ok(error is None):
            raise RuntimeError(f"a tensor-parallel rank failed to write its slices: {error or 'on another rank'}")

    def joined(self) -> dict[str, torch.Tensor]:
        """The canonical tensors, gathered to the leader once (for buffers that are not shared memory)."""
        if self._joined is None:
            self._joined = self._gather()
        return self._joined

    @cross_rank("staged.gather")
    def _gather(self) -> dict[str, torch.Tensor] | None:
        return gather_state(self.mirror.group, self.local)

    def release(self) -> None:
        self.local = {}


@dataclass(frozen=True, slots=True, eq=False)
class StagedTensor:
    """A canonical state tensor whose slices wait on the ranks (a cache_store.checkpoint.RankWritten)."""

    owner: StagedState
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def materialize(self) -> torch.Tensor:
        return self.owner.joined()[self.name]
