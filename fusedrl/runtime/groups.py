"""Process groups of every placement, built once per worker in a deterministic order.

All workers of a run form one torch.distributed world whose rank is the device id.
Each placement (DESIGN.md "Layouts") needs, for the rank a device holds in it:

- its **tp group** (megatron-core's layers take it explicitly),
- its **dp group** (gradient all-reduce across replicas),
- its **model-parallel group** (all tp x pp ranks of its dp replica: grad-norm reduction,
  as Megatron's ``get_model_parallel_group``),
- its **kv-share group** when ``tp > num_kv_heads`` (ranks holding the same replicated
  kv head sum that head's gradients),
- its pipeline neighbours (point-to-point, on the world group).

Groups are cached by rank list (placements on the same devices share their groups)
and created as Megatron's ``initialize_model_parallel`` does: every worker walks the
*same* global list of rank lists (all placements, in a fixed order) and calls
``dist.new_group`` for each, member or not. ``use_local_synchronization=True`` (members
only) was tried and rejected: with torch 2.13 + gloo, creating ``[0, 1, 2, 3]`` hangs
when ranks 0 and 1 created ``[0, 1]`` just before and ranks 2 and 3 did not (the
members' rendezvous keys depend on how many groups each created before), which is
exactly the situation of overlapping placements.

Lifecycle::

    registry = GroupRegistry(device)
    registry.create_all(rank_lists([(placement, model_config), ...], world, extra))   # same on every worker
    groups = placement_groups(registry, placement, device, model_config)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from fusedrl.layout import Placement, RankCoord
from fusedrl.models.config import ModelConfig


class GroupRegistry:
    """Cache of process groups of this worker, keyed by the sorted tuple of world ranks."""

    def __init__(self, rank: int):
        self.rank = rank
        self._groups: dict[tuple[int, ...], object] = {}

    def create_all(self, rank_lists: list[tuple[int, ...]]) -> None:
        """Create, in order, every group of ``rank_lists``; every rank of the world must
        call this with the same list. Keeps the groups this rank belongs to."""
        for ranks in rank_lists:
            if ranks in self._groups:
                continue
            group = dist.new_group(list(ranks))
            if self.rank in ranks:
                self._groups[ranks] = group

    def get(self, ranks) -> object:
        key = tuple(sorted(ranks))
        if key not in self._groups:
            raise KeyError(f"process group {key} was not created on rank {self.rank}: "
                           f"add it to the rank lists every worker creates at setup")
        return self._groups[key]


def _kv_share(config: ModelConfig, tp: int) -> int:
    """How many consecutive tp ranks hold the same kv head (1: no replication)."""
    return tp // config.num_kv_heads if tp > config.num_kv_heads else 1


def placement_rank_lists(p: Placement, config: ModelConfig) -> list[tuple[int, ...]]:
    """Every group (as sorted device tuples) a placement needs, in a fixed order."""
    L, dev = p.layout, p.devices
    out: list[tuple[int, ...]] = []
    for pp in range(L.pp):
        for dp in range(L.dp):
            out.append(tuple(sorted(dev[r] for r in L.tp_group_ranks(dp, pp))))
    for pp in range(L.pp):
        for tp in range(L.tp):
            out.append(tuple(sorted(dev[r] for r in L.dp_group_ranks(tp, pp))))
    for dp in range(L.dp):
        out.append(tuple(sorted(dev[L.rank(dp, t, s)] for s in range(L.pp)
                                for t in range(L.tp))))
    share = _kv_share(config, L.tp)
    if share > 1:
        for pp in range(L.pp):
            for dp in range(L.dp):
                for h in range(L.tp // share):
                    out.append(tuple(sorted(dev[L.rank(dp, t, pp)]
                                            for t in range(h * share, (h + 1) * share))))
    return out


def rank_lists(placements: list[tuple[Placement, ModelConfig]], world_size: int,
               extra: list[tuple[int, ...]] = ()) -> list[tuple[int, ...]]:
    """The global, deterministic list of groups of a run: one singleton group per
    device (for full, unsharded models), every (placement, model)'s groups, then
    ``extra`` (e.g. weight-broadcast groups)."""
    out = [(d,) for d in range(world_size)]
    for p, config in placements:
        out.extend(placement_rank_lists(p, config))
    out.extend(tuple(sorted(e)) for e in extra)
    seen, unique = set(), []
    for r in out:
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def check_tp_order(p: Placement, key: str) -> None:
    """megatron-core uses the group rank as the tp rank and torch orders a group by world
    rank, so the devices of a tp group must increase with the tp rank."""
    L = p.layout
    for pp in range(L.pp):
        for dp in range(L.dp):
            devs = [p.devices[r] for r in L.tp_group_ranks(dp, pp)]
            if devs != sorted(devs):
                raise ValueError(f"placement.{key}={p}: the devices of a tp group must "
                                 f"increase with the tp rank, got {devs}")


@dataclass
class PlacementGroups:
    """What one device needs to run its rank of a placement."""

    placement: Placement
    rank: int
    coord: RankCoord
    tp_group: object
    dp_group: object | None  # None when dp == 1
    mp_group: object | None  # tp x pp ranks of this dp replica; None when that is one rank
    kv_share_group: object | None  # None unless tp > num_kv_heads
    kv_share: int
    prev: int | None  # device of the previous pipeline stage (same dp, tp), or None
    next: int | None
    stage0: int  # device of stage 0 (same dp, tp): where pipelined generation returns

    @property
    def is_first(self) -> bool:
        return self.prev is None

    @property
    def is_last(self) -> bool:
        return self.next is None


def placement_groups(registry: GroupRegistry, p: Placement, device: int,
                     config: ModelConfig) -> PlacementGroups:
    rank = p.rank_of(device)
    if rank is None:
        raise ValueError(f"device {device} is not in placement {p}")
    L, dev = p.layout, p.devices
    c = L.coord(rank)
    tp_group = registry.get(dev[r] for r in L.tp_group_ranks(c.dp, c.pp))
    dp_group = registry.get(dev[r] for r in L.dp_group_ranks(c.tp, c.pp)) if L.dp > 1 else None
    mp_group = (registry.get(dev[L.rank(c.dp, t, s)] for s in range(L.pp) for t in range(L.tp))
                if L.tp * L.pp > 1 else None)
    share = _kv_share(config, L.tp)
    kv_group = None
    if share > 1:
        h = c.tp // share
        kv_group = registry.get(dev[L.rank(c.dp, t, c.pp)]
                                for t in range(h * share, (h + 1) * share))
    prev = dev[L.rank(c.dp, c.tp, c.pp - 1)] if c.pp > 0 else None
    nxt = dev[L.rank(c.dp, c.tp, c.pp + 1)] if c.pp < L.pp - 1 else None
    return PlacementGroups(p, rank, c, tp_group, dp_group, mp_group, kv_group, share, prev, nxt,
                           dev[L.rank(c.dp, c.tp, 0)])
