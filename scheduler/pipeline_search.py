"""Search for a fused schedule: makespan first, then peak memory (RLHFuse §5).

RLHFuse §5 anneals per-node task orders from a greedy start, first on the
makespan, then on peak activation memory accepting only moves that keep the
makespan. This module drives the kernels of ``fusedrl.kernels.schedule_eval``:

1. **Makespan.** Simulated annealing whose moves swap the two tasks of a
   *critical* node arc (a pair of adjacent tasks on a longest path) rather than
   any adjacent pair: only those can shorten the makespan and none deadlocks
   (the job-shop neighbourhood of van Laarhoven et al. 1992). Geometric cooling
   over a fixed number of iterations, then a restart from the best order seen,
   until the makespan reaches the lower bound or the phase's time is up.
2. **Memory.** Simulated annealing over random adjacent swaps on the peak
   memory (plus a fraction of the mean node peak, to break plateaus), rejecting
   any move that raises the makespan found in phase 1.

``workers`` independent searches run in parallel processes with different seeds
(one in this process); the best result wins, ties to the lowest worker index,
so a search is deterministic for a given seed unless the time limit cuts it
short. Phase budgets are iteration counts; the time limit only caps them.
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
    makespan_share: float = 0.75  # at most this share of the time goes to phase 1
    run_iters_per_task: float = 40.0  # phase-1 iterations per annealing run, per task
    min_run_iters: int = 20_000
    temp_start: float = 0.5  # phase-1 temperatures, in mean task durations
    temp_end: float = 0.01
    memory_iters_per_task: float = 300.0  # phase-2 iteration budget, per task
    memory_temp_start: float = 0.5  # phase-2 temperatures, in mean per-task memory
    memory_temp_end: float = 0.01
    memory_alpha: float = 0.5  # weight of the mean node peak in the memory energy
    chunk_iters: int = 5_000  # iterations between clock checks
    energy: str = "tardiness"  # phase-1 energy: "makespan" or "tardiness"
    memory_cap: float = math.inf  # hard per-node cap on peak memory


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


def _run(job: _Job) -> SearchOutcome:
    """One search (both phases) from ``job.order``; runs in a worker process too."""
    t_begin = time.time()
    cfg, tb = job.config, job.table
    ke.seed_rng(job.seed)
    T = tb.num_tasks
    eps = _tolerance(tb)
    order = job.order.copy()
    pos = np.empty(T, np.int64)
    pos[order] = np.arange(T)
    start, end = np.zeros(T), np.zeros(T)
    mk = ke.evaluate(order, pos, job.node_ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    if mk < 0:
        raise ValueError("search: the starting order deadlocks")
    out = SearchOutcome(order=order.copy(), makespan=mk, peak_memory=0.0, seed=job.seed)
    out.history.append((0.0, mk))

    # Phase 1: makespan.
    phase1_end = min(job.deadline, t_begin + cfg.makespan_share * max(0.0, job.deadline - t_begin))
    mean_dur = float(tb.dur.mean())
    run_iters = max(cfg.min_run_iters, int(cfg.run_iters_per_task * T))
    cooling = (cfg.temp_end / cfg.temp_start) ** (1.0 / run_iters)
    best_order = order.copy()
    prefix, peaks = np.zeros(T), np.zeros(tb.num_nodes)
    ke.node_peaks(order, job.node_ptr, tb.memd, prefix, peaks)
    due = job.lower_bound - tb.tails()
    w_mk, w_late = (1.0, 0.0) if cfg.energy == "makespan" else (0.0, 1.0)

    def energy_state() -> np.ndarray:
        late = ke.tardiness(end, due)
        return np.array([w_mk * mk + w_late * late, best_mk, cfg.temp_start * mean_dur, iters, mk, late])

    best_mk, iters = mk, 0.0
    state = energy_state()
    run_left = run_iters
    while state[1] > job.lower_bound + eps and time.time() < phase1_end:
        before = state[1]
        n = min(cfg.chunk_iters, run_left)
        ke.anneal_makespan(order, pos, job.node_ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd, tb.klass, start,
                           end, prefix, best_order, due, state, n, cooling, w_mk, w_late, cfg.memory_cap,
                           job.lower_bound, eps)
        run_left -= n
        if state[1] < before:
            out.history.append((time.time() - t_begin, float(state[1])))
        if run_left <= 0:  # restart from the best order, reheated
            best_mk, iters = state[1], state[3]
            order[:] = best_order
            pos[order] = np.arange(T)
            mk = ke.evaluate(order, pos, job.node_ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
            ke.node_peaks(order, job.node_ptr, tb.memd, prefix, peaks)
            state = energy_state()
            run_left = run_iters
            out.restarts += 1
    out.makespan_iters = int(state[3])
    mk_best = float(state[1])
    out.reached_bound = mk_best <= job.lower_bound + eps

    # Phase 2: peak memory at no loss of makespan.
    order[:] = best_order
    pos[order] = np.arange(T)
    mk = ke.evaluate(order, pos, job.node_ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    peak = ke.node_peaks(order, job.node_ptr, tb.memd, prefix, peaks)
    mem_unit = float(np.abs(tb.memd).mean())
    mem_iters = int(cfg.memory_iters_per_task * T)
    if mem_unit > 0 and mem_iters > 0 and peak > job.memory_floor + eps:
        energy = ke._memory_energy(peaks, cfg.memory_alpha)
        t0 = cfg.memory_temp_start * mem_unit
        m_cool = (cfg.memory_temp_end / cfg.memory_temp_start) ** (1.0 / mem_iters)
        m_state = np.array([energy, energy, t0, 0.0, peak])
        while m_state[3] < mem_iters and time.time() < job.deadline and m_state[4] > job.memory_floor + eps:
            n = int(min(cfg.chunk_iters * 4, mem_iters - m_state[3]))
            ke.anneal_memory(order, pos, job.node_ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd,
                             start, end, prefix, peaks, best_order, m_state, n, m_cool, mk, cfg.memory_alpha,
                             eps)
        out.memory_iters = int(m_state[3])
    pos[best_order] = np.arange(T)
    mk = ke.evaluate(best_order, pos, job.node_ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    out.order = best_order.copy()
    out.makespan = float(mk)
    out.peak_memory = float(ke.node_peaks(best_order, job.node_ptr, tb.memd, prefix, peaks))
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
    if workers > 1:
        try:
            with ProcessPoolExecutor(max_workers=workers - 1, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_run, job) for job in jobs[1:]]
                outcomes[0] = _run(jobs[0])
                for i, fut in enumerate(futures, start=1):
                    try:
                        outcomes[i] = fut.result(timeout=max(30.0, config.time_limit + 30.0))
                    except Exception:  # a lost helper process only costs its search
                        outcomes[i] = None
        except OSError:  # processes unavailable (sandbox): search here only
            pass
    if outcomes[0] is None:
        outcomes[0] = _run(jobs[0])
    eps = _tolerance(table)
    done = [o for o in outcomes if o is not None]
    done.sort(key=lambda o: (math.floor(o.makespan / eps), o.peak_memory))
    return done
