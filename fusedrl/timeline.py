"""Per-device event timestamps: the one owner of an iteration's timing.

Every model call records, on the process that runs it, one :class:`DeviceEvent`
``(device, call, start, end)`` in wall-clock seconds (``time.time()``: comparable across
the processes of one host; on a multi-node cluster across hosts as far as their clocks
agree). The single-device trainer records into its own :class:`EventLog`; each Ray
worker keeps one and hands its events to the controller once per iteration
(``Worker.take_events``). From the events of one iteration:

- the stage spans (``timing_s/gen``, ``timing_s/inference``, ``timing_s/train``,
  ``timing_s/realloc``): first start to last end of the calls of that stage
  (:func:`stage_spans`);
- ``perf/device_utilization``: the fraction of device-seconds of the iteration spent
  inside model calls (:func:`device_utilization`; 1.0 is the limit no schedule can
  pass);
- a timeline picture, one row per device, one colour per call (:func:`plot_timeline`).

Call names (the ``call`` of an event) say what ran: ``gen``, ``logp:actor_infer``,
``logp:ref``, ``values``, ``score``, ``train:actor``/``train:critic`` (and, inside a
fused schedule, ``F:actor``/``B:critic``...: one event per pipeline task), ``realloc``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

STAGE_OF_CALL = {"gen": "gen", "logp": "inference", "values": "inference",
                 "score": "inference", "train": "train", "F": "train", "B": "train",
                 "realloc": "realloc"}
"""The stage a call belongs to: the prefix of its name before ``:``."""

COLOURS = {"gen": "#4C72B0", "logp:actor_infer": "#8172B3", "logp:ref": "#CCB974",
           "values": "#DD8452", "score": "#937860", "train:actor": "#55A868",
           "train:critic": "#C44E52", "F:actor": "#55A868", "B:actor": "#2F6B3E",
           "F:critic": "#E07B7E", "B:critic": "#C44E52", "realloc": "#8C8C8C"}


@dataclass(frozen=True)
class DeviceEvent:
    """One model call on one device: wall-clock ``start``/``end`` seconds."""

    device: int
    call: str
    start: float
    end: float

    @property
    def stage(self) -> str:
        return STAGE_OF_CALL.get(self.call.split(":", 1)[0], "other")


class EventLog:
    """The events of one process (a worker, or the single-device trainer).

    ``synchronize`` is called before each timestamp (a CUDA device's
    ``torch.cuda.synchronize``), so an event spans the device's work, not its launch.
    """

    def __init__(self, device: int = 0, synchronize=None):
        self.device = device
        self.synchronize = synchronize or (lambda: None)
        self.events: list[DeviceEvent] = []

    @contextmanager
    def record(self, call: str, device: int | None = None):
        self.synchronize()
        t0 = time.time()
        try:
            yield
        finally:
            self.synchronize()
            self.events.append(DeviceEvent(self.device if device is None else device, call,
                                           t0, time.time()))

    def add(self, call: str, start: float, end: float) -> None:
        self.events.append(DeviceEvent(self.device, call, start, end))

    def take(self) -> list[DeviceEvent]:
        """The events since the last call (and forget them)."""
        out, self.events = self.events, []
        return out


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def device_utilization(events: list[DeviceEvent], devices: list[int], start: float,
                       end: float) -> float:
    """Fraction of the device-seconds of ``[start, end]`` spent inside model calls
    (overlapping calls on one device count once)."""
    if end <= start or not devices:
        return 0.0
    busy = 0.0
    for d in devices:
        spans = [(max(e.start, start), min(e.end, end)) for e in events
                 if e.device == d and e.end > start and e.start < end]
        busy += _union_length(spans)
    return busy / ((end - start) * len(devices))


def stage_spans(events: list[DeviceEvent]) -> dict[str, float]:
    """``{stage: last end - first start}`` over the events of each stage."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for e in events:
        first[e.stage] = min(first.get(e.stage, e.start), e.start)
        last[e.stage] = max(last.get(e.stage, e.end), e.end)
    return {s: last[s] - first[s] for s in first}


def stage_overlap(events: list[DeviceEvent], a: str, b: str) -> float | None:
    """Seconds during which stages ``a`` and ``b`` both ran somewhere (None: one of them
    did not run)."""
    sa = [e for e in events if e.stage == a]
    sb = [e for e in events if e.stage == b]
    if not sa or not sb:
        return None
    lo = max(min(e.start for e in sa), min(e.start for e in sb))
    hi = min(max(e.end for e in sa), max(e.end for e in sb))
    return max(0.0, hi - lo)


def busy_seconds(events: list[DeviceEvent]) -> dict[str, float]:
    """Device-seconds per call name (summed over devices)."""
    out: dict[str, float] = {}
    for e in events:
        out[e.call] = out.get(e.call, 0.0) + (e.end - e.start)
    return out


def to_rows(events: list[DeviceEvent], origin: float) -> list[dict]:
    """JSON-ready rows, times relative to ``origin``."""
    return [{"device": e.device, "call": e.call, "start_s": round(e.start - origin, 6),
             "end_s": round(e.end - origin, 6)} for e in events]


def plot_timeline(events: list[DeviceEvent], path, title: str = "", origin: float | None = None
                  ) -> None:
    """One row per device, one colour per call; measured wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not events:
        raise ValueError("no events to plot")
    origin = min(e.start for e in events) if origin is None else origin
    devices = sorted({e.device for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(devices) + 1.2))
    seen: dict[str, str] = {}
    for e in events:
        colour = COLOURS.get(e.call, COLOURS.get(e.call.split(":")[0], "#999999"))
        seen.setdefault(e.call, colour)
        ax.broken_barh([(e.start - origin, e.end - e.start)],
                       (devices.index(e.device) - 0.4, 0.8), facecolors=colour,
                       edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(devices)), [f"device {d}" for d in devices])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (measured)")
    ax.set_title(title or "model calls per device (measured)")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in seen.items()],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
              ncol=1 + len(seen) // (4 * len(devices) + 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
