"""Parallel layouts and device placements (the contract of docs/design.md "Layouts").

A :class:`ParallelLayout` is a (dp, tp, pp) triple; a :class:`Placement` binds it to
concrete device ids. Rank order is Megatron's: tp fastest, then dp, then pp::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank,   device = devices[rank]

Text form: ``dp2tp2pp1@0-3`` (devices 0..3) or ``dp4tp1pp1@4,5,6,7``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fusedrl.models.config import ModelConfig

_LAYOUT_RE = re.compile(r"^dp(\d+)tp(\d+)pp(\d+)$")


class RankCoord(NamedTuple):
    """Coordinates of one rank inside a layout."""

    dp: int
    tp: int
    pp: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of data, tensor and pipeline parallelism."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"layout {name} must be a positive integer, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def rank(self, dp: int, tp: int, pp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def coord(self, rank: int) -> RankCoord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside layout {self} of {self.world_size} ranks")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return RankCoord(dp, tp, pp)

    def tp_group_ranks(self, dp: int, pp: int) -> list[int]:
        return [self.rank(dp, t, pp) for t in range(self.tp)]

    def dp_group_ranks(self, tp: int, pp: int) -> list[int]:
        return [self.rank(d, tp, pp) for d in range(self.dp)]

    def pp_group_ranks(self, dp: int, tp: int) -> list[int]:
        return [self.rank(dp, tp, p) for p in range(self.pp)]

    def check_model(self, config: "ModelConfig") -> None:
        """Raise ``ValueError`` naming the number that does not fit ``config``."""
        if config.num_heads % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide num_heads={config.num_heads} of the model"
            )
        kv = config.num_kv_heads
        if kv >= self.tp:
            if kv % self.tp:
                raise ValueError(f"tp={self.tp} does not divide num_kv_heads={kv} of the model")
        elif self.tp % kv:
            raise ValueError(
                f"tp={self.tp} is larger than num_kv_heads={kv} but not a multiple of it"
            )
        if config.intermediate_size % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide intermediate_size={config.intermediate_size}"
            )
        if config.vocab_size % self.tp:
            raise ValueError(f"tp={self.tp} does not divide vocab_size={config.vocab_size}")
        if self.pp > config.num_layers:
            raise ValueError(f"pp={self.pp} is larger than num_layers={config.num_layers}")

    @classmethod
    def parse(cls, text: str) -> "ParallelLayout":
        m = _LAYOUT_RE.match(text.strip())
        if not m:
            raise ValueError(f"layout {text!r} is not of the form dp<N>tp<N>pp<N>")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    def __str__(self) -> str:
        return f"dp{self.dp}tp{self.tp}pp{self.pp}"


def _parse_devices(text: str) -> tuple[int, ...]:
    devices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = (int(x) for x in part.split("-"))
            if hi < lo:
                raise ValueError(f"device range {part!r} is empty")
            devices.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            devices.append(int(part))
        else:
            raise ValueError(f"device list {text!r}: {part!r} is not a device id or a range a-b")
    return tuple(devices)


def _format_devices(devices: tuple[int, ...]) -> str:
    if len(devices) > 1 and list(devices) == list(range(devices[0], devices[-1] + 1)):
        return f"{devices[0]}-{devices[-1]}"
    return ",".join(str(d) for d in devices)


@dataclass(frozen=True)
class Placement:
    """A layout on concrete devices: rank ``r`` runs on ``devices[r]``."""

    layout: ParallelLayout
    devices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(int(d) for d in self.devices))
        if len(self.devices) != self.layout.world_size:
            raise ValueError(
                f"placement {self.layout} needs {self.layout.world_size} devices, "
                f"got {len(self.devices)}: {list(self.devices)}"
            )
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"placement devices repeat a device: {list(self.devices)}")
        if any(d < 0 for d in self.devices):
            raise ValueError(f"placement devices must be >= 0: {list(self.devices)}")

    @classmethod
    def parse(cls, text: str) -> "Placement":
        if "@" not in text:
            raise ValueError(f"placement {text!r} is not of the form dp<N>tp<N>pp<N>@<devices>")
        layout_text, dev_text = text.split("@", 1)
        return cls(ParallelLayout.parse(layout_text), _parse_devices(dev_text))

    def device(self, rank: int) -> int:
        return self.devices[rank]

    def rank_of(self, device: int) -> int | None:
        try:
            return self.devices.index(device)
        except ValueError:
            return None

    def check_cluster(self, num_devices: int) -> None:
        bad = [d for d in self.devices if d >= num_devices]
        if bad:
            raise ValueError(
                f"placement {self} uses device {bad[0]} but the cluster has {num_devices} "
                f"devices (0..{num_devices - 1})"
            )

    def __str__(self) -> str:
        return f"{self.layout}@{_format_devices(self.devices)}"
