"""RLHFuse §5's published schedule search, reimplemented as the quality reference.

``bench/schedule_quality.py`` compares :func:`~.pipeline_schedule.solve` against this
search on the same instances, time limit and cores. It follows the paper's
description (greedy start, annealing parameters, two phases), not its code:

1. **Start**: the greedy bidirectional list schedule, ready work first and the larger
   model first (:func:`~.pipeline_baselines.greedy_fused`, rule ``"ready"``, no
   in-flight or memory cap).
2. **Makespan**: simulated annealing over swaps of two adjacent tasks on a node
   (:func:`~fusedrl.kernels.schedule_eval.anneal_adjacent_swaps`), initial temperature
   the starting makespan, geometric cooling by 0.999995 per move. It runs until it
   reaches the lower bound, has cooled below ``1e-3`` of a mean task, or has used
   ``makespan_share`` of the time.
3. **Memory**: simulated annealing on the peak memory over random moves, accepting only
   moves that keep the makespan (:func:`~fusedrl.kernels.schedule_eval.anneal_memory_moves`
   with no peak-aimed moves and the highest node peak alone as the energy), from the
   starting peak as temperature, for the rest of the time.

``workers`` searches run at once with different seeds, as in :func:`~.pipeline_search.search`;
the best (makespan, then peak) wins. All figures are predicted by the scheduler's model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from fusedrl.kernels import schedule_eval as ke

from .pipeline_baselines import greedy_fused
from .pipeline_bounds import lower_bound
from .pipeline_problem import FusedProblem, Schedule, TaskTable, fifo_relabel
from .pipeline_schedule import time_schedule
from .pipeline_search import _tolerance, default_workers, run_in_processes

COOLING = 0.999995  # per move (RLHFuse §5)


@dataclass(frozen=True)
class ReferenceResult:
    """The best schedule of the reference search and where it started."""

    makespan: float
    peak_memory: float
    start_makespan: float
    start_peak_memory: float
    makespan_moves: int
    memory_moves: int
    seconds: float


@dataclass(frozen=True)
class _Job:
    table: TaskTable
    node_ptr: np.ndarray
    order: np.ndarray
    target: float
    seed: int
    deadline: float
    makespan_share: float
    chunk: int


def _run(job: _Job) -> tuple[np.ndarray, float, float, int, int]:
    """One reference search; returns ``(order, makespan, peak, makespan moves, memory moves)``."""
    t0 = time.time()
    tb, ptr = job.table, job.node_ptr
    T = tb.num_tasks
    ke.seed_rng(job.seed)
    eps = _tolerance(tb)
    order = job.order.copy()
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    pos[order] = np.arange(T)
    mk = float(ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end))
    best_order = order.copy()
    cold = 1e-3 * float(tb.dur.mean())
    state = np.array([mk, mk, mk, 0.0])
    phase_end = t0 + job.makespan_share * max(0.0, job.deadline - t0)
    while state[1] > job.target + eps and state[2] > cold and time.time() < phase_end:
        ke.anneal_adjacent_swaps(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end, best_order,
                                 state, job.chunk, COOLING, job.target, eps)
    makespan_moves = int(state[3])
    # Memory, from the best order: never past its makespan.
    order[:] = best_order
    pos[order] = np.arange(T)
    mk = float(ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end))
    prefix, peaks = np.zeros(T), np.zeros(tb.num_nodes)
    peak = float(ke.node_peaks(order, ptr, tb.memd, prefix, peaks))
    mstate = np.array([peak, peak, peak, 0.0, peak])
    while time.time() < job.deadline:
        ke.anneal_memory_moves(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd, tb.klass, start, end,
                               prefix, peaks, best_order, mstate, job.chunk, COOLING, mk, 0.0, eps, 0.0)
    best = time_schedule(tb, Schedule(best_order, ptr))
    return best_order, best.makespan, best.peak_memory, makespan_moves, int(mstate[3])


def reference_search(problem: FusedProblem | dict, time_limit: float = 20.0, seed: int = 0,
                     workers: int | None = None, makespan_share: float = 0.75) -> ReferenceResult:
    """RLHFuse §5's search as published (module doc) within ``time_limit`` seconds."""
    t0 = time.time()
    if not isinstance(problem, FusedProblem):
        problem = FusedProblem.from_dict(problem)
    table = TaskTable.build(problem)
    greedy = greedy_fused(problem, table, "ready", inflight_slack=None)
    first = fifo_relabel(table, greedy)
    start = time_schedule(table, first)
    n = workers or default_workers(table.num_tasks)
    seeds = np.random.SeedSequence(seed).generate_state(n).tolist()
    deadline = t0 + time_limit
    jobs = [_Job(table, first.node_ptr, first.order, lower_bound(problem).value, int(s) % (2**31 - 1), deadline,
                 makespan_share, 20_000) for s in seeds]
    outs = [o for o in run_in_processes(_run, jobs, timeout=time_limit + 30.0) if o is not None]
    eps = _tolerance(table)
    _, mk, peak, _, _ = min(outs, key=lambda o: (math.floor(o[1] / eps), o[2]))
    return ReferenceResult(makespan=mk, peak_memory=peak, start_makespan=start.makespan,
                           start_peak_memory=start.peak_memory,
                           makespan_moves=sum(o[3] for o in outs), memory_moves=sum(o[4] for o in outs),
                           seconds=time.time() - t0)
