"""Process groups of every placement, built once per worker in a deterministic order.

All workers of a run form one torch.distributed world whose rank is the device id.
Each placement (docs/design.md "Layouts") needs, for the rank a device holds in it:

- its **tp group** (megatron-core's layers take it explicitly),
- its **dp group** (gradient all-reduce across replicas),
- its **model-parallel group** (all tp x pp ranks of its dp replica: grad-norm reduction,
  as Megatron's ``get_model_parallel_group``),
- its **kv-share group** when ``tp > num_kv_heads`` (ranks holding the same replicated
  kv head sum that head's gradients),
- its pipeline neighbours, and for each neighbour pair one point-to-point **channel**
  group per (pipeline, direction) (:func:`pipeline_channels`).

Channels exist for NCCL (``cluster.accelerator: cuda``): an NCCL communicator runs its
operations in posting order on one stream and ignores tags, so a stage that posts
"send activation ``i+1``, receive gradient ``i``" while its neighbour posts "send
gradient ``i``, receive activation ``i+1``" deadlocks once messages outgrow NCCL's
buffers (Megatron batches such pairs for this reason), and fused actor/critic messages
on one link (RLHFuse §5) could be matched to the wrong receive. With one group per
(pipeline, direction) each stream carries one pipeline's messages in one direction,
posted in the same micro-batch order on both ends (the schedules are FIFO per stage).
gloo uses the same channels (tags still apply), so the CPU tests run this routing.

Every group is created with the run's backend (:func:`fusedrl.devices.collective_backend`:
gloo on CPU, ``cpu:gloo,cuda:nccl`` on GPU), so CPU tensors still travel over gloo.

Groups are cached by rank list (placements on the same devices share their groups)
and created as Megatron's ``initialize_model_parallel`` does: every worker walks the
*same* global list of rank lists (all placements, in a fixed order) and calls
``dist.new_group`` for each, member or not. ``use_local_synchronization=True`` (members
only) was tried and rejected: with torch 2.13 + gloo, creating ``[0, 1, 2, 3]`` hangs
when ranks 0 and 1 created ``[0, 1]`` just before and ranks 2 and 3 did not (the
members' rendezvous keys depend on how many groups each created before), which is
exactly the situation of overlapping placements.

Lifecycle::

    registry = GroupRegistry(device, backend)
    registry.create_all(rank_lists([(placement, model_config), ...], world, extra),
                        pipeline_channels([placement, ...]))    # same on every worker
    groups = placement_groups(registry, placement, device, model_config)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from fusedrl.layout import Placement, RankCoord
from fusedrl.models.config import ModelConfig


PIPELINES = 2
"""Point-to-point channels per neighbour pair: pipeline 0 (any single pipeline: 1F1B,
pipelined inference; the actor when fused) and pipeline 1 (the critic when fused)."""


def channel_name(pipeline: int, grad: bool) -> str:
    """The channel of one pipeline's activations (``grad=False``, downstream) or
    activation gradients (upstream)."""
    if not 0 <= pipeline < PIPELINES:
        raise ValueError(f"pipeline must be in [0, {PIPELINES}), got {pipeline}")
    return f"p{pipeline}{'grad' if grad else 'act'}"


CHANNELS = tuple(channel_name(p, g) for p in range(PIPELINES) for g in (False, True))
"""Every channel of one neighbour pair."""


class GroupRegistry:
    """Cache of process groups of this worker, keyed by the sorted tuple of world ranks
    (and, for point-to-point channels, the channel name). ``backend`` is the run's
    :func:`fusedrl.devices.collective_backend` (``None``: the world's)."""

    def __init__(self, rank: int, backend: str | None = None):
        self.rank = rank
        self.backend = backend
        self._groups: dict[tuple[int, ...], object] = {}
        self._channels: dict[tuple[tuple[int, ...], str], object] = {}

    def _new(self, ranks: tuple[int, ...]):
        return dist.new_group(list(ranks), backend=self.backend)

    def create_all(self, rank_lists: list[tuple[int, ...]],
                   channels: list[tuple[tuple[int, ...], str]] = ()) -> None:
        """Create, in order, every group of ``rank_lists`` and then every channel
        ``(ranks, name)``; every rank of the world must call this with the same lists.
        Keeps the groups this rank belongs to."""
        for ranks in rank_lists:
            if ranks in self._groups:
                continue
            group = self._new(ranks)
            if self.rank in ranks:
                self._groups[ranks] = group
        for key in channels:
            if key in self._channels:
                continue
            group = self._new(key[0])
            if self.rank in key[0]:
                self._channels[key] = group

    def channel(self, peer: int, name: str) -> object:
        """The channel ``name`` between this rank and ``peer``."""
        key = (tuple(sorted((self.rank, peer))), name)
        if key not in self._channels:
            raise KeyError(f"channel {key} was not created on rank {self.rank}: add it to "
                           f"the channels every worker creates at setup")
        return self._channels[key]

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


def pipeline_channels(placements: list[Placement]) -> list[tuple[tuple[int, int], str]]:
    """Every point-to-point channel of a run, in a fixed order: for each placement with
    ``pp > 1``, each pair of neighbouring stages of a (dp, tp) chain, each
    :func:`channel_name` (module doc: why NCCL needs them)."""
    out: list[tuple[tuple[int, int], str]] = []
    for p in placements:
        L, dev = p.layout, p.devices
        for dp in range(L.dp):
            for tp in range(L.tp):
                for pp in range(L.pp - 1):
                    pair = tuple(sorted((dev[L.rank(dp, tp, pp)], dev[L.rank(dp, tp, pp + 1)])))
                    out.extend((pair, n) for n in CHANNELS if (pair, n) not in out)
    return out


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
    channels: dict = field(default_factory=dict)  # (peer, channel name) -> group

    def link(self, peer: int, pipeline: int, grad: bool):
        """The group carrying ``pipeline``'s activations (``grad=False``) or gradients
        between this rank and its neighbour ``peer``."""
        return self.channels[peer, channel_name(pipeline, grad)]

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
    channels = {(peer, n): registry.channel(peer, n)
                for peer in (prev, nxt) if peer is not None for n in CHANNELS}
    return PlacementGroups(p, rank, c, tp_group, dp_group, mp_group, kv_group, share, prev, nxt,
                           dev[L.rank(c.dp, c.tp, 0)], channels)
