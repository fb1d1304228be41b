"""Fused pipeline schedules end to end: problem in, timed schedule and report out.

:func:`solve` is what ``fusedrl schedule`` and the runtime call: it validates the
problem, computes the lower bound and the 1F1B baselines, builds the greedy
fused start (RLHFuse §5), runs the search of :mod:`.pipeline_search`, and
returns a :class:`ScheduleResult` whose :meth:`~ScheduleResult.to_dict` is the
output format of docs/design.md (plus a ``baseline`` and a ``search`` section).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fusedrl.kernels import schedule_eval as ke

from .pipeline_baselines import one_f_one_b, pipeline_node_orders, start_candidates
from .pipeline_bounds import LowerBound, lower_bound, memory_lower_bound
from .pipeline_problem import FusedProblem, Schedule, TaskTable, fifo_relabel, tasks_to_records
from .pipeline_search import SearchConfig, SearchOutcome, search


@dataclass(frozen=True)
class Timing:
    """A schedule with its start/end times and memory."""

    schedule: Schedule
    start: np.ndarray
    end: np.ndarray
    makespan: float
    node_peaks: np.ndarray

    @property
    def peak_memory(self) -> float:
        return float(self.node_peaks.max()) if self.node_peaks.size else 0.0

    def bubble_ratio(self, total_work: float, nodes: int) -> float:
        """Share of node time left idle before the makespan."""
        return 1.0 - total_work / (nodes * self.makespan) if self.makespan > 0 else 0.0


def time_schedule(table: TaskTable, schedule: Schedule) -> Timing:
    """Times a schedule; ``ValueError`` if its orders deadlock."""
    T = table.num_tasks
    start, end = np.zeros(T), np.zeros(T)
    pos = schedule.positions()
    mk = ke.evaluate(schedule.order, pos, schedule.node_ptr, table.dur, table.node, table.dep,
                     table.succ, start, end)
    if mk < 0:
        raise ValueError("schedule: the task orders deadlock")
    peaks = np.zeros(table.num_nodes)
    ke.node_peaks(schedule.order, schedule.node_ptr, table.memd, np.zeros(T), peaks)
    return Timing(schedule, start, end, float(mk), peaks)


def side_by_side_peak(problem: FusedProblem, table: TaskTable) -> float:
    """Peak memory of each pipeline's own 1F1B, summed per node (max over nodes).

    The memory of running the pipelines' 1F1B schedules side by side on shared
    nodes: the bar the fused schedule's peak is held to.
    """
    total = np.zeros(problem.nodes)
    for p in range(len(problem.pipelines)):
        for n, order in enumerate(pipeline_node_orders(problem, table, p)):
            if order.size:
                total[n] += max(0.0, float(np.cumsum(table.memd[order]).max()))
    return float(total.max())


def memory_floor(problem: FusedProblem) -> float:
    """No schedule has a lower peak: a micro-batch's backward starts only after all
    its forwards, so some node holds all of one micro-batch's stages there."""
    per_node = np.zeros((problem.nodes, len(problem.pipelines)))
    for p, spec in enumerate(problem.pipelines):
        np.add.at(per_node[:, p], np.array(spec.stage_nodes), np.array(spec.mem))
    return float(per_node.max())


@dataclass(frozen=True)
class ScheduleResult:
    """A searched fused schedule, its bound and the sequential 1F1B baseline."""

    problem: FusedProblem
    table: TaskTable
    timing: Timing
    lower_bound: LowerBound
    greedy: Timing
    sequential_1f1b: Timing
    side_by_side_peak: float
    outcomes: list[SearchOutcome]
    seconds: float

    @property
    def makespan(self) -> float:
        return self.timing.makespan

    @property
    def peak_memory(self) -> float:
        return self.timing.peak_memory

    @property
    def bubble_ratio(self) -> float:
        return self.timing.bubble_ratio(self.problem.total_work, self.problem.nodes)

    @property
    def memory_lower_bound(self) -> float:
        """No schedule as short as this one holds less peak memory
        (:func:`~.pipeline_bounds.memory_lower_bound`)."""
        return memory_lower_bound(self.problem, self.makespan)

    def tasks(self) -> list[dict[str, Any]]:
        return tasks_to_records(self.problem, self.table, self.timing.schedule, self.timing.start,
                                self.timing.end)

    def to_dict(self) -> dict[str, Any]:
        """docs/design.md's output format, with ``baseline`` and ``search`` sections added."""
        work, nodes = self.problem.total_work, self.problem.nodes
        seq = self.sequential_1f1b
        return {
            "makespan": self.makespan,
            "lower_bound": self.lower_bound.value,
            "bound_gap_reason": self.lower_bound.gap_reason(),
            "peak_memory": self.peak_memory,
            "memory_lower_bound": self.memory_lower_bound,
            "bubble_ratio": self.bubble_ratio,
            "tasks": self.tasks(),
            "baseline": {
                "sequential_1f1b": {"makespan": seq.makespan, "peak_memory": seq.peak_memory,
                                    "bubble_ratio": seq.bubble_ratio(work, nodes)},
                "greedy": {"makespan": self.greedy.makespan, "peak_memory": self.greedy.peak_memory},
                "side_by_side_1f1b_peak_memory": self.side_by_side_peak,
            },
            "search": {
                "seconds": self.seconds,
                "lower_bound_parts": self.lower_bound.to_dict(),
                "workers": [{"seed": o.seed, "makespan": o.makespan, "peak_memory": o.peak_memory,
                             "makespan_iters": o.makespan_iters, "memory_iters": o.memory_iters,
                             "memory_probes": [{"cap": c, "kept_makespan": ok} for c, ok in o.memory_probes],
                             "restarts": o.restarts, "seconds": o.seconds} for o in self.outcomes],
            },
        }


MEMORY_CAP_1F1B = "1f1b"
"""``memory_cap`` value: the peak of the pipelines' 1F1B schedules side by side."""


def resolve_memory_cap(memory_cap: float | str | None, side_by_side: float) -> float:
    """The cap as a number: ``None`` -> no cap (``inf``), ``"1f1b"`` -> ``side_by_side``."""
    if memory_cap is None:
        return math.inf
    if isinstance(memory_cap, str):
        if memory_cap.strip().lower() == MEMORY_CAP_1F1B:
            return side_by_side
        raise ValueError(f"memory_cap: expected a number or '1f1b', got {memory_cap!r}")
    cap = float(memory_cap)
    if math.isnan(cap):
        raise ValueError(f"memory_cap: expected a number or '1f1b', got {memory_cap!r}")
    return cap


def solve(problem: FusedProblem | dict, time_limit: float = 10.0, seed: int = 0,
          workers: int | None = None, memory_cap: float | str | None = None,
          config: SearchConfig | None = None) -> ScheduleResult:
    """Finds a fused schedule for ``problem`` within about ``time_limit`` seconds.

    The objective is lexicographic (RLHFuse §5's two phases): the shortest makespan
    first, then the lowest peak memory at that makespan; the memory phase never
    gives back makespan. ``memory_cap``: the highest peak memory a node may reach
    (a hard constraint of both phases, e.g. the device memory left for activations).
    ``None`` (default): no cap; ``"1f1b"``: the peak of the pipelines' 1F1B
    schedules side by side (fusion never costs memory). A cap below the memory of
    one micro-batch's stages on a node is a ``ValueError`` (no schedule fits).
    """
    t0 = time.time()
    if not isinstance(problem, FusedProblem):
        problem = FusedProblem.from_dict(problem)
    if time_limit < 0 or not math.isfinite(time_limit):
        raise ValueError(f"time_limit: must be a non-negative number of seconds, got {time_limit!r}")
    table = TaskTable.build(problem)
    sbs = side_by_side_peak(problem, table)
    cap = resolve_memory_cap(memory_cap, sbs)
    floor = memory_floor(problem)
    if not cap >= floor:
        raise ValueError(f"memory_cap: {memory_cap} is below {floor}, the memory one micro-batch "
                         "holds on some node; no schedule fits")
    cfg = replace(config or SearchConfig(), time_limit=float(time_limit), seed=int(seed), memory_cap=cap)
    if workers is not None:
        cfg = replace(cfg, workers=int(workers))
    lb = lower_bound(problem, cfg.memory_cap)
    seq = time_schedule(table, one_f_one_b(problem, table))
    # Constructive starts take at most a share of the time (a few seconds on 4k tasks);
    # with no time at all, every start is built (the best start is the answer).
    deadline = t0 + cfg.start_share * cfg.time_limit if cfg.time_limit > 0 else None
    starts = {name: time_schedule(table, s) for name, s in start_candidates(
        problem, table, lb.value, cfg.memory_cap, deadline=deadline)}
    fits = [t for t in list(starts.values()) + [seq] if t.peak_memory <= cfg.memory_cap]
    if not fits:
        raise ValueError(f"memory_cap: no start schedule fits under {cfg.memory_cap}")
    paper = [t for n, t in starts.items() if n.startswith("ready")]
    greedy = min([t for t in paper if t.peak_memory <= cfg.memory_cap] or paper,
                 key=lambda t: (t.makespan, t.peak_memory))
    # The search starts from the best start (or sequential 1F1B) within the cap.
    best = min(fits, key=lambda t: (t.makespan, t.peak_memory))
    first = fifo_relabel(table, best.schedule)
    # The Pareto front of the other starts below its peak seeds the memory phase.
    front, lowest = [], best.peak_memory
    for t in sorted(fits, key=lambda t: (t.makespan, t.peak_memory)):
        if t.peak_memory < lowest:
            lowest = t.peak_memory
            front.append((fifo_relabel(table, t.schedule).order, t.makespan, t.peak_memory))
    remaining = max(0.0, cfg.time_limit - (time.time() - t0))
    outcomes = search(problem, table, first, lb.value, floor, replace(cfg, time_limit=remaining), front)
    timing = time_schedule(table, Schedule(outcomes[0].order, first.node_ptr))
    return ScheduleResult(problem, table, timing, lb, greedy, seq, sbs, outcomes, time.time() - t0)
