"""Reallocation planner: which device sends which region of which parameter.

Implements the planning half of ReaLHF's parameter reallocation (Mei et al.,
arXiv 2406.14088, "parameter reallocation"): weights held under a source placement
are resharded into a destination placement (different dp/tp/pp, overlapping,
identical or disjoint device sets) without gathering any full parameter, and
moving only what each destination device does not already hold.

The plan is pure data (no torch): a list of :class:`Transfer` whose regions are in
full-parameter coordinates (see :mod:`fusedrl.models.sharding`). Contract
(docs/design.md "Reallocation plan"):

- every destination shard is covered exactly once (no gaps, no overlaps);
- the sender holds what it sends under the source placement;
- no byte crosses devices that the destination device already held under the
  source placement: such bytes are local copies (``src == dst``).

Algorithm. Like ReaLHF, stages are intersected by layer ranges and each parameter
is sliced by its own rule. Concretely, each destination region is cut along the
source shard grid: within one layout the regions of a parameter are identical
(replicas) or disjoint, so the distinct source regions tile the parameter and each
non-empty intersection is one *piece*, held whole by every replica of that source
shard. A piece the destination device held under the source is a local copy;
otherwise it must cross devices. ReaLHF uses one broadcast group per source shard
and destination shards, choosing the sender per node; here each distinct remote
piece gets one sender for all its receivers (so the executor can broadcast it),
chosen among the source replicas holding it as the least-loaded one so far,
assigning the largest pieces first (greedy longest-processing-time). Within one
group of replicas the senders' loads then differ by at most one piece, so no
single sender carries the whole model when the source has dp replicas.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

from fusedrl.layout import Placement
from fusedrl.models.config import ModelConfig
from fusedrl.models.sharding import (
    Head,
    Region,
    intersect,
    param_shapes,
    region_numel,
    shard_regions,
)


class Transfer(NamedTuple):
    """Copy ``region`` of parameter ``param`` from device ``src`` to device ``dst``.

    ``src == dst`` is a local copy (the destination device held the region under
    the source placement). ``region`` is in full-parameter coordinates.
    """

    param: str
    src: int
    dst: int
    region: Region

    @property
    def numel(self) -> int:
        return region_numel(self.region)

    @property
    def is_local(self) -> bool:
        return self.src == self.dst


class BroadcastGroup(NamedTuple):
    """One piece that one sender delivers to several (or one) destination devices."""

    param: str
    src: int
    region: Region
    dsts: tuple[int, ...]

    @property
    def numel(self) -> int:
        return region_numel(self.region)


@dataclass(frozen=True)
class ReallocPlan:
    """The transfers that reshard a model from ``src`` to ``dst``.

    ``bytes_minimum`` is computed from the shards alone (what each destination
    device needs and did not hold), independently of the transfers; for a plan from
    :func:`plan_realloc` it equals ``bytes_moved``.
    """

    config: ModelConfig
    src: Placement
    dst: Placement
    head: Head
    dtype_bytes: int
    transfers: tuple[Transfer, ...]
    bytes_minimum: int

    # ---- volumes -------------------------------------------------------------------
    @property
    def remote_transfers(self) -> list[Transfer]:
        return [t for t in self.transfers if not t.is_local]

    @property
    def local_transfers(self) -> list[Transfer]:
        return [t for t in self.transfers if t.is_local]

    @property
    def bytes_moved(self) -> int:
        """Bytes that cross devices (each receiver counted)."""
        return sum(t.numel for t in self.transfers if not t.is_local) * self.dtype_bytes

    @property
    def bytes_local(self) -> int:
        """Bytes copied on the device that already held them."""
        return sum(t.numel for t in self.transfers if t.is_local) * self.dtype_bytes

    @property
    def bytes_per_sender(self) -> dict[int, int]:
        """Cross-device bytes each sending device sends, one copy per receiver."""
        out: dict[int, int] = defaultdict(int)
        for t in self.transfers:
            if not t.is_local:
                out[t.src] += t.numel * self.dtype_bytes
        return dict(sorted(out.items()))

    @property
    def broadcast_bytes_per_sender(self) -> dict[int, int]:
        """Bytes each sender sends if every broadcast group is sent once."""
        out: dict[int, int] = defaultdict(int)
        for g in self.broadcast_groups():
            out[g.src] += g.numel * self.dtype_bytes
        return dict(sorted(out.items()))

    # ---- views ---------------------------------------------------------------------
    def broadcast_groups(self) -> list[BroadcastGroup]:
        """Remote transfers grouped by identical ``(param, src, region)``.

        A group with several ``dsts`` can run as one broadcast from ``src``; a group
        with one destination is a point-to-point send.
        """
        groups: dict[tuple[str, int, Region], list[int]] = {}
        for t in self.transfers:
            if not t.is_local:
                groups.setdefault((t.param, t.src, t.region), []).append(t.dst)
        return [BroadcastGroup(p, s, r, tuple(sorted(d))) for (p, s, r), d in groups.items()]

    def sends(self, device: int) -> list[Transfer]:
        """Remote transfers ``device`` sends."""
        return [t for t in self.transfers if t.src == device and not t.is_local]

    def recvs(self, device: int) -> list[Transfer]:
        """Transfers (local copies included) that fill ``device``'s destination shard."""
        return [t for t in self.transfers if t.dst == device]

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.config.to_dict(),
            "src": str(self.src),
            "dst": str(self.dst),
            "head": self.head,
            "dtype_bytes": self.dtype_bytes,
            "bytes_moved": self.bytes_moved,
            "bytes_minimum": self.bytes_minimum,
            "bytes_local": self.bytes_local,
            "bytes_per_sender": {str(k): v for k, v in self.bytes_per_sender.items()},
            "transfers": [
                {"param": t.param, "src": t.src, "dst": t.dst, "region": [list(r) for r in t.region]}
                for t in self.transfers
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReallocPlan":
        transfers = tuple(
            Transfer(t["param"], int(t["src"]), int(t["dst"]),
                     tuple((int(a), int(b)) for a, b in t["region"]))
            for t in d["transfers"]
        )
        return cls(ModelConfig(**d["model"]), Placement.parse(d["src"]), Placement.parse(d["dst"]),
                   d["head"], int(d["dtype_bytes"]), transfers, int(d["bytes_minimum"]))

    def __str__(self) -> str:
        senders = self.bytes_per_sender
        return (f"ReallocPlan({self.src} -> {self.dst}: {len(self.transfers)} transfers, "
                f"{self.bytes_moved} B moved (minimum {self.bytes_minimum}), "
                f"{self.bytes_local} B local, max per sender "
                f"{max(senders.values()) if senders else 0} B)")


def _device_regions(
    config: ModelConfig, placement: Placement, head: Head
) -> dict[int, dict[str, Region]]:
    """device -> {param: region} under ``placement`` (one rank per device)."""
    return {
        dev: shard_regions(config, placement.layout, rank, head)
        for rank, dev in enumerate(placement.devices)
    }


def _check_inputs(
    config: ModelConfig, src: Placement, dst: Placement, head: str, dtype_bytes: int,
    num_devices: int | None,
) -> None:
    if head not in ("lm", "value"):
        raise ValueError(f"head must be 'lm' or 'value', got {head!r}")
    if not isinstance(dtype_bytes, int) or dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be a positive integer, got {dtype_bytes!r}")
    for role, placement in (("source", src), ("destination", dst)):
        try:
            placement.layout.check_model(config)
            if num_devices is not None:
                placement.check_cluster(num_devices)
        except ValueError as e:
            raise ValueError(f"{role} placement {placement}: {e}") from e


def minimum_bytes(
    config: ModelConfig, src: Placement, dst: Placement, head: Head = "lm", dtype_bytes: int = 4
) -> int:
    """Bytes the destination devices need and did not hold under ``src``.

    The lower bound of any reallocation's cross-device volume, from the shards alone.
    """
    _check_inputs(config, src, dst, head, dtype_bytes, None)
    held = _device_regions(config, src, head)
    total = 0
    for dev, regions in _device_regions(config, dst, head).items():
        mine = held.get(dev, {})
        for name, region in regions.items():
            need = region_numel(region)
            if name in mine:
                overlap = intersect(region, mine[name])
                if overlap is not None:
                    need -= region_numel(overlap)
            total += need
    return total * dtype_bytes


def plan_realloc(
    config: ModelConfig,
    src: Placement,
    dst: Placement,
    head: Head = "lm",
    dtype_bytes: int = 4,
    num_devices: int | None = None,
) -> ReallocPlan:
    """Plan resharding ``config``'s weights from placement ``src`` to ``dst``.

    Any two placements work (their world sizes may differ). ``dtype_bytes`` only
    scales the byte counts. Raises ``ValueError`` before planning when a layout
    cannot shard the model (naming the number) or, given ``num_devices``, when a
    placement uses a device outside ``0..num_devices-1``.
    """
    _check_inputs(config, src, dst, head, dtype_bytes, num_devices)
    order = {name: i for i, name in enumerate(param_shapes(config, head))}
    held = _device_regions(config, src, head)

    # param -> distinct source region -> devices holding it (dp / kv replicas).
    holders: dict[str, dict[Region, list[int]]] = defaultdict(lambda: defaultdict(list))
    for dev, regions in held.items():
        for name, region in regions.items():
            holders[name][region].append(dev)

    transfers: list[Transfer] = []
    # (param, piece region) -> (candidate senders, receiving devices)
    pieces: dict[tuple[str, Region], tuple[list[int], list[int]]] = {}
    for dev, regions in _device_regions(config, dst, head).items():
        mine = held.get(dev, {})
        for name, region in regions.items():
            for src_region, devs in holders[name].items():
                piece = intersect(region, src_region)
                if piece is None:
                    continue
                # Source regions are identical or disjoint, so the destination
                # device either held all of this piece or none of it.
                if mine.get(name) == src_region:
                    transfers.append(Transfer(name, dev, dev, piece))
                else:
                    pieces.setdefault((name, piece), (devs, []))[1].append(dev)

    # One sender per piece, largest pieces first, least-loaded replica wins
    # (ties: lowest device id) -- balances sending across source dp replicas.
    load: dict[int, int] = defaultdict(int)
    for (name, piece), (devs, receivers) in sorted(
        pieces.items(), key=lambda kv: (-region_numel(kv[0][1]), order[kv[0][0]], kv[0][1])
    ):
        sender = min(devs, key=lambda d: (load[d], d))
        load[sender] += region_numel(piece)
        transfers.extend(Transfer(name, sender, r, piece) for r in receivers)

    transfers.sort(key=lambda t: (order[t.param], t.region, t.dst, t.src))
    return ReallocPlan(config, src, dst, head, dtype_bytes, tuple(transfers),
                       minimum_bytes(config, src, dst, head, dtype_bytes))

