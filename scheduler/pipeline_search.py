"""Search for a fused schedule: makespan first, then peak memory (RLHFuse §5).

RLHFuse §5 anneals per-node task orders from a greedy start, first on the
makespan, then on peak activation memory accepting only moves that keep the
makespan. This module drives the kernels of ``fusedrl.kernels.schedule_eval``:

1. **Makespan.** Simulated annealing whose moves mostly swap the two tasks of a
   *critical* node arc (a pair of adjacent tasks on a longest path) rather than
   any adjacent pair: only those can shorten the makespan and none deadlocks
   (the job-shop neighbourhood of van Laarhoven et al. 1992). Under a memory cap
   a swap that would lift a node past it also moves an earlier forward behind
   the pair to make room; a share of random block moves (1-3 adjacent tasks
   moved a few places) keeps the search connected. Only first-in-first-out
   micro-batch orders are searched (:func:`~.pipeline_problem.fifo_relabel`).
   Geometric cooling over a fixed number of iterations, then a restart from the
   best order seen, until the makespan reaches the lower bound or the phase's
   time (or run budget) is up.
2. **Memory.** Simulated annealing over random adjacent swaps on the peak
   memory (plus a fraction of the mean node peak, to break plateaus), rejecting
   any move that raises the makespan found in phase 1.

``workers`` independent searches run in parallel processes with different seeds
(one in this process); the best result wins, ties to the lowest worker index,
so a search is deterministic for a given seed unless the time limit cuts it
short. Phase budgets are iteration counts; the time limit only caps them.
Helpers are *spawned* (safe next to threads, Ray or torch), so a script that
searches with ``workers > 1`` needs the usual ``if __name__ == "__main__":``
guard; where no helper can start, the search runs in this process alone.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from fusedrl.kernels import schedule_eval as ke

from .pipeline_problem import Schedule, TaskTable


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of :func:`search`; the defaults are what the quality benchmark uses."""

    time_limit: float = 10.0  # seconds, whole search
    seed: int = 0
    workers: int | None = None  # processes; None: 2 if the machine has them and the problem is not tiny
    makespan_share: float = 0.9  # at most this share of the time goes to phase 1
    run_iters_per_task: float = 40.0  # phase-1 iterations per annealing run, per task
    min_run_iters: int = 20_000
    temp_start: float = 1.0  # phase-1 temperatures, in mean task durations ...
    temp_size: float = 1000.0  # ... scaled by temp_size / tasks on larger problems
    temp_end: float = 0.01
    max_runs: int | None = None  # phase-1 annealing runs (None: until the bound or the time limit)
    random_moves: float = 0.002  # share of phase-1 moves that move a random block instead of a critical pair
    memory_iters_per_task: float = 100.0  # phase-2 iteration budget, per task
    memory_temp_start: float = 0.5  # phase-2 temperatures, in mean per-task memory
    memory_temp_end: float = 0.01
    memory_alpha: float = 0.5  # weight of the mean node peak in the memory energy
    chunk_iters: int = 5_000  # iterations between clock checks
    memory_cap: float = math.inf  # hard per-node cap on peak memory (solve() sets it)


@dataclass
class SearchOutcome:
    """Best order of one search and how it got there."""

    order: np.ndarray
    makespan: float
    peak_memory: float
    seed: int
    makespan_iters: int = 0
    memory_iters: int = 0
    restarts: int = 0
    seconds: float = 0.0
    reached_bound: bool = False
    history: list[tuple[float, float]] = field(default_factory=list)  # (seconds, best makespan)


@dataclass(frozen=True)
class _Job:
    """Everything one search process needs (picklable)."""

    table: TaskTable
    node_ptr: np.ndarray
    order: np.ndarray
    lower_bound: float
    memory_floor: float
    seed: int
    deadline: float  # time.time() value
    config: SearchConfig


def _tolerance(table: TaskTable) -> float:
    return 1e-9 * max(1.0, float(table.dur.sum()))


def _phase_makespan(job: _Job, order: np.ndarray, out: SearchOutcome, t_begin: float) -> np.ndarray:
    """Phase 1: anneal the makespan within the memory cap; returns the best order."""
    cfg, tb, ptr = job.config, job.table, job.node_ptr
    T, eps = tb.num_tasks, _tolerance(tb)
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    prefix, peaks = np.zeros(T), np.zeros(tb.num_nodes)
    best_order = order.copy()
    phase_end = min(job.deadline, t_begin + cfg.makespan_share * max(0.0, job.deadline - t_begin))
    run_iters = max(cfg.min_run_iters, int(cfg.run_iters_per_task * T))
    cooling = (cfg.temp_end / cfg.temp_start) ** (1.0 / run_iters)
    # Larger problems anneal colder: more tasks, more ways for uphill moves to pile up.
    temp0 = cfg.temp_start * min(1.0, cfg.temp_size / T) * float(tb.dur.mean())
    best, iters, runs = out.makespan, 0.0, 0
    while best > job.lower_bound + eps and time.time() < phase_end and (cfg.max_runs is None or runs < cfg.max_runs):
        # One annealing run from the best order so far (a restart, reheated).
        order[:] = best_order
        pos[order] = np.arange(T)
        mk = ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
        ke.node_peaks(order, ptr, tb.memd, prefix, peaks)
        state = np.array([mk, best, temp0, iters])
        left = run_iters
        while left > 0 and state[1] > job.lower_bound + eps and time.time() < phase_end:
            n = min(cfg.chunk_iters, left)
            ke.anneal_makespan(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd, tb.klass, start, end,
                               prefix, best_order, state, n, cooling, cfg.memory_cap, job.lower_bound, eps,
                               cfg.random_moves)
            left -= n
            if state[1] < best:
                best = float(state[1])
                out.history.append((time.time() - t_begin, best))
        iters = state[3]
        runs += 1
    out.makespan_iters, out.restarts = int(iters), max(0, runs - 1)
    out.reached_bound = best <= job.lower_bound + eps
    return best_order


def _phase_memory(job: _Job, best_order: np.ndarray, out: SearchOutcome) -> None:
    """Phase 2: anneal the peak memory without losing makespan (``best_order`` in place)."""
    cfg, tb, ptr = job.config, job.table, job.node_ptr
    T, eps = tb.num_tasks, _tolerance(tb)
    order = best_order.copy()
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    pos[order] = np.arange(T)
    mk = ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    prefix, peaks = np.zeros(T), np.zeros(tb.num_nodes)
    peak = ke.node_peaks(order, ptr, tb.memd, prefix, peaks)
    mem_unit = float(np.abs(tb.memd).mean())
    budget = int(cfg.memory_iters_per_task * T)
    if mem_unit <= 0 or budget <= 0 or peak <= job.memory_floor + eps:
        return
    energy = ke.memory_energy(peaks, cfg.memory_alpha)
    cooling = (cfg.memory_temp_end / cfg.memory_temp_start) ** (1.0 / budget)
    state = np.array([energy, energy, cfg.memory_temp_start * mem_unit, 0.0, peak])
    while state[3] < budget and time.time() < job.deadline and state[4] > job.memory_floor + eps:
        n = int(min(4 * cfg.chunk_iters, budget - state[3]))
        ke.anneal_memory(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd, start, end, prefix, peaks,
                         best_order, state, n, cooling, mk, cfg.memory_alpha, eps)
    out.memory_iters = int(state[3])


def _run(job: _Job) -> SearchOutcome:
    """One search (both phases) from ``job.order``; runs in a worker process too."""
    t_begin = time.time()
    tb, ptr = job.table, job.node_ptr
    ke.seed_rng(job.seed)
    T = tb.num_tasks
    order = job.order.copy()
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    pos[order] = np.arange(T)
    mk = ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    if mk < 0:
        raise ValueError("search: the starting order deadlocks")
    out = SearchOutcome(order=order, makespan=float(mk), peak_memory=0.0, seed=job.seed)
    out.history.append((0.0, float(mk)))
    best_order = _phase_makespan(job, order, out, t_begin)
    _phase_memory(job, best_order, out)
    pos[best_order] = np.arange(T)
    out.order = best_order
    out.makespan = float(ke.evaluate(best_order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end))
    out.peak_memory = float(ke.node_peaks(best_order, ptr, tb.memd, np.zeros(T), np.zeros(tb.num_nodes)))
    out.seconds = time.time() - t_begin
    return out


def default_workers(num_tasks: int) -> int:
    """Two processes on a machine with two or more cores, one for tiny problems."""
    return 1 if num_tasks < 256 else min(2, os.cpu_count() or 1)


def search(table: TaskTable, start: Schedule, lower_bound: float, memory_floor: float,
           config: SearchConfig = SearchConfig()) -> list[SearchOutcome]:
    """Runs ``config.workers`` searches from ``start``; returns them best first."""
    workers = config.workers or default_workers(table.num_tasks)
    deadline = time.time() + config.time_limit
    seeds = np.random.SeedSequence(config.seed).generate_state(workers).tolist()
    jobs = [_Job(table, start.node_ptr, start.order, lower_bound, memory_floor, int(s) % (2**31 - 1),
                 deadline, config) for s in seeds]
    outcomes: list[SearchOutcome | None] = [None] * workers
    pool, futures = None, []
    if workers > 1:
        try:
            pool = ProcessPoolExecutor(max_workers=workers - 1, mp_context=get_context("spawn"))
            futures = [pool.submit(_run, job) for job in jobs[1:]]
        except Exception:  # no child processes here (daemonic process, sandbox): search in this one
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            pool, futures = None, []
    try:
        outcomes[0] = _run(jobs[0])
        for i, fut in enumerate(futures, start=1):
            try:
                outcomes[i] = fut.result(timeout=max(30.0, config.time_limit + 30.0))
            except Exception:  # a lost helper process only costs its search
                outcomes[i] = None
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    eps = _tolerance(table)
    done = [o for o in outcomes if o is not None]
    done.sort(key=lambda o: (math.floor(o.makespan / eps), o.peak_memory))
    return done
