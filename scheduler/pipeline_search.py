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
2. **Memory** (lexicographic: never at the cost of makespan). (a) *Capped
   probes*: ask for a peak below the best so far, build the shortest list schedule
   within that cap and anneal its makespan under the cap (phase 1's moves) back to
   phase 1's makespan; success lowers the best peak, a probe that runs out of its
   time halves the step. These reach much lower peaks than swaps can, since between
   two good orders lie orders with higher peaks. (b) Simulated annealing on the
   peak memory (plus a fraction of the mean node peak, to break plateaus) over
   moves aimed at the peak (a forward before it moved past the next backward, or a
   backward after it moved before it) and random block moves, rejecting any move
   that raises the makespan. Both stop at the memory lower bound at that makespan
   (:func:`~.pipeline_bounds.memory_lower_bound`).

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

from .pipeline_problem import FusedProblem, Schedule, TaskTable, fifo_relabel


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
    start_share: float = 0.25  # at most this share of the time builds the constructive starts (solve())
    caps_share: float = 0.85  # share of phase 2's time for the capped probes (the rest: swap annealing)
    probe_share: float = 0.25  # a memory probe gets this share of the time left for probes ...
    probe_min_seconds: float = 0.3  # ... and at least this long
    memory_starts: bool = True  # probes also try the constructive starts under their cap
    memory_peak_moves: float = 0.5  # share of phase-2b moves aimed at the peak (the rest: random block moves)
    memory_runs: int | None = 30  # phase 2b stops after this many runs in a row without a lower peak (None: never)
    probe_runs: int = 2  # phase-1 annealing runs per memory probe
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
    memory_bound: float = 0.0  # no schedule as short holds less (phase 2 stops there)
    memory_probes: list[tuple[float, bool]] = field(default_factory=list)  # (cap, reached the makespan)
    history: list[tuple[float, float]] = field(default_factory=list)  # (seconds, best makespan)


@dataclass(frozen=True)
class _Job:
    """Everything one search process needs (picklable)."""

    problem: FusedProblem
    table: TaskTable
    node_ptr: np.ndarray
    order: np.ndarray
    lower_bound: float
    memory_floor: float
    seed: int
    deadline: float  # time.time() value
    config: SearchConfig
    low_memory_starts: tuple = ()  # (order, makespan, peak) of starts with less memory than ``order``


def _tolerance(table: TaskTable) -> float:
    return 1e-9 * max(1.0, float(table.dur.sum()))


def _anneal(job: _Job, order: np.ndarray, cap: float, target: float, phase_end: float,
            max_runs: int | None = None, out: SearchOutcome | None = None,
            t_begin: float = 0.0) -> tuple[np.ndarray, float, int, int]:
    """Anneals the makespan of ``order`` (within ``cap``) until it reaches ``target``,
    ``phase_end`` or ``max_runs`` runs; returns ``(best order, its makespan, iterations,
    runs)``. ``order`` must fit ``cap``; it is used as scratch space."""
    cfg, tb, ptr = job.config, job.table, job.node_ptr
    T, eps = tb.num_tasks, _tolerance(tb)
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    prefix, peaks = np.zeros(T), np.zeros(tb.num_nodes)
    best_order = order.copy()
    pos[order] = np.arange(T)
    best = float(ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end))
    run_iters = max(cfg.min_run_iters, int(cfg.run_iters_per_task * T))
    cooling = (cfg.temp_end / cfg.temp_start) ** (1.0 / run_iters)
    # Larger problems anneal colder: more tasks, more ways for uphill moves to pile up.
    temp0 = cfg.temp_start * min(1.0, cfg.temp_size / T) * float(tb.dur.mean())
    iters, runs = 0.0, 0
    while best > target + eps and time.time() < phase_end and (max_runs is None or runs < max_runs):
        # One annealing run from the best order so far (a restart, reheated).
        order[:] = best_order
        pos[order] = np.arange(T)
        mk = ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
        ke.node_peaks(order, ptr, tb.memd, prefix, peaks)
        state = np.array([mk, best, temp0, iters])
        left = run_iters
        while left > 0 and state[1] > target + eps and time.time() < phase_end:
            n = min(cfg.chunk_iters, left)
            ke.anneal_makespan(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd, tb.klass, start, end,
                               prefix, best_order, state, n, cooling, cap, target, eps, cfg.random_moves)
            left -= n
            if state[1] < best:
                best = float(state[1])
                if out is not None:
                    out.history.append((time.time() - t_begin, best))
        iters = state[3]
        runs += 1
    return best_order, best, int(iters), runs


def _phase_makespan(job: _Job, order: np.ndarray, out: SearchOutcome, t_begin: float) -> np.ndarray:
    """Phase 1: anneal the makespan within the memory cap; returns the best order."""
    cfg = job.config
    phase_end = min(job.deadline, t_begin + cfg.makespan_share * max(0.0, job.deadline - t_begin))
    best_order, best, iters, runs = _anneal(job, order, cfg.memory_cap, job.lower_bound, phase_end,
                                            cfg.max_runs, out, t_begin)
    out.makespan_iters, out.restarts = iters, max(0, runs - 1)
    out.reached_bound = best <= job.lower_bound + _tolerance(job.table)
    return best_order


def _peak(tb: TaskTable, ptr: np.ndarray, order: np.ndarray) -> float:
    return float(ke.node_peaks(order, ptr, tb.memd, np.zeros(tb.num_tasks), np.zeros(tb.num_nodes)))


def _makespan(tb: TaskTable, ptr: np.ndarray, order: np.ndarray) -> float:
    T = tb.num_tasks
    pos = np.empty(T, np.int64)
    pos[order] = np.arange(T)
    return float(ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, np.zeros(T), np.zeros(T)))


def _capped_start(job: _Job, order: np.ndarray, cap: float) -> np.ndarray | None:
    """The shortest of a few list schedules whose nodes hold at most ``cap``: ``order``
    repaired (its tasks by their start times, forwards held back where the cap binds),
    the critical-path rule, and :func:`~.pipeline_baselines.paced_due_dates` over a
    grid of paces, all admitting forwards only within the cap."""
    from .pipeline_baselines import PACES, greedy_fused, list_schedule, paced_due_dates

    tb, ptr, problem = job.table, job.node_ptr, job.problem
    T = tb.num_tasks
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    pos[order] = np.arange(T)
    ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    cands = [list_schedule(problem, tb, start, None, cap), greedy_fused(problem, tb, "tail", None, False, cap)]
    if job.config.memory_starts:
        work = np.array([sum(p.fwd) + sum(p.bwd) for p in problem.pipelines])
        big = work >= work.max()
        for a in PACES:
            for b in (PACES if not big.all() else (a,)):
                due = paced_due_dates(problem, tb, job.lower_bound, np.where(big, a, b))
                cands.append(list_schedule(problem, tb, due, None, cap))
    best, best_key = None, None
    for s in cands:
        if s is None or _peak(tb, ptr, s.order) > cap:
            continue
        key = (_makespan(tb, ptr, s.order), _peak(tb, ptr, s.order))
        if best_key is None or key < best_key:
            best, best_key = fifo_relabel(tb, Schedule(s.order, ptr.copy())).order, key
    # The starts solve() built (with in-flight caps per stage: less memory, a little
    # longer) are often the closest to the makespan within a cap.
    for order, mk, peak in job.low_memory_starts:
        if peak <= cap and (best_key is None or (mk, peak) < best_key):
            best, best_key = order, (mk, peak)
    return None if best is None else best.copy()


def _phase_memory_caps(job: _Job, best_order: np.ndarray, out: SearchOutcome, target: float,
                       memory_bound: float, phase_end: float) -> np.ndarray:
    """Phase 2a: lower the peak memory keeping the makespan ``target`` (RLHFuse §5's
    second phase) by searching the makespan under ever lower caps.

    Each probe asks for a peak ``step`` below the best so far: it builds the shortest
    list schedule within that cap (:func:`_capped_start`) and anneals its makespan
    under the cap (phase 1's moves) until it is back at ``target``. A probe that gets
    there is the new best, one that runs out of its time halves ``step``; probing stops
    at ``memory_bound`` (no schedule that short holds less), below the smallest memory
    step, or at ``phase_end``. Moves never lift a node past the cap, so large drops in
    peak that adjacent swaps cannot find (they must cross higher peaks) are reached.
    """
    tb, ptr, eps = job.table, job.node_ptr, _tolerance(job.table)
    mems = np.abs(tb.memd[tb.memd != 0])
    if mems.size == 0:
        return best_order
    unit = float(mems.min())
    meps = 1e-9 * max(1.0, float(mems.max()))
    peak = _peak(tb, ptr, best_order)
    step = max(unit, 0.5 * (peak - memory_bound))
    while time.time() < phase_end and peak > memory_bound + meps and step >= unit - meps:
        cap = max(memory_bound, peak - step)
        now = time.time()
        slice_end = min(phase_end, now + max(job.config.probe_min_seconds, job.config.probe_share * (phase_end - now)))
        start = _capped_start(job, best_order, cap + meps)
        ok = False
        if start is not None:
            order, mk, iters, _ = _anneal(job, start, cap, target, slice_end, job.config.probe_runs)
            out.memory_iters += iters
            new_peak = _peak(tb, ptr, order)
            if mk <= target + eps and new_peak < peak - meps:
                best_order, peak, ok = order, new_peak, True
        out.memory_probes.append((float(cap), ok))
        if not ok:
            step *= 0.5
    return best_order


def _phase_memory(job: _Job, best_order: np.ndarray, out: SearchOutcome, memory_bound: float) -> None:
    """Phase 2b: anneal the peak memory without losing makespan (``best_order`` in
    place), over moves aimed at the peak and random block moves
    (:func:`~fusedrl.kernels.schedule_eval.anneal_memory_moves`); runs of
    ``memory_iters_per_task`` iterations per task, each restarted from the best order,
    until the deadline, ``memory_bound``, or ``memory_runs`` runs in a row that found
    no lower peak (on small problems a lower peak can take a few seconds of runs)."""
    cfg, tb, ptr = job.config, job.table, job.node_ptr
    T, eps = tb.num_tasks, _tolerance(tb)
    pos, start, end = np.empty(T, np.int64), np.zeros(T), np.zeros(T)
    prefix, peaks = np.zeros(T), np.zeros(tb.num_nodes)
    mem_unit = float(np.abs(tb.memd).mean())
    budget = int(cfg.memory_iters_per_task * T)
    if mem_unit <= 0 or budget <= 0:
        return
    cooling = (cfg.memory_temp_end / cfg.memory_temp_start) ** (1.0 / budget)
    order = best_order.copy()
    pos[order] = np.arange(T)
    mk = ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
    best_peak = ke.node_peaks(order, ptr, tb.memd, prefix, peaks)
    best_energy = ke.memory_energy(peaks, cfg.memory_alpha)
    stale = 0  # runs in a row that did not lower the peak
    while time.time() < job.deadline and best_peak > memory_bound + eps and (
            cfg.memory_runs is None or stale < cfg.memory_runs):
        order[:] = best_order
        pos[order] = np.arange(T)
        ke.evaluate(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, start, end)
        ke.node_peaks(order, ptr, tb.memd, prefix, peaks)
        state = np.array([best_energy, best_energy, cfg.memory_temp_start * mem_unit, 0.0, best_peak])
        while state[3] < budget and time.time() < job.deadline and state[4] > memory_bound + eps:
            n = int(min(4 * cfg.chunk_iters, budget - state[3]))
            ke.anneal_memory_moves(order, pos, ptr, tb.dur, tb.node, tb.dep, tb.succ, tb.memd, tb.klass, start,
                                   end, prefix, peaks, best_order, state, n, cooling, mk, cfg.memory_alpha, eps,
                                   cfg.memory_peak_moves)
        stale = stale + 1 if float(state[4]) >= best_peak - eps else 0
        best_energy, best_peak = float(state[1]), float(state[4])
        out.memory_iters += int(state[3])


def _run(job: _Job) -> SearchOutcome:
    """One search (both phases) from ``job.order``; runs in a worker process too."""
    from .pipeline_bounds import memory_lower_bound

    t_begin = time.time()
    tb, ptr = job.table, job.node_ptr
    ke.seed_rng(job.seed)
    T = tb.num_tasks
    order = job.order.copy()
    mk = _makespan(tb, ptr, order)
    if mk < 0:
        raise ValueError("search: the starting order deadlocks")
    out = SearchOutcome(order=order, makespan=float(mk), peak_memory=0.0, seed=job.seed)
    out.history.append((0.0, float(mk)))
    best_order = _phase_makespan(job, order, out, t_begin)
    target = _makespan(tb, ptr, best_order)
    # Phase 2 never gives back makespan: every order it keeps ends by ``target``.
    mem_lb = max(job.memory_floor, memory_lower_bound(job.problem, target))
    out.memory_bound = mem_lb
    now = time.time()
    caps_end = now + job.config.caps_share * max(0.0, job.deadline - now)
    best_order = _phase_memory_caps(job, best_order, out, target, mem_lb, caps_end)
    _phase_memory(job, best_order, out, mem_lb)
    out.order = best_order
    out.makespan = _makespan(tb, ptr, best_order)
    out.peak_memory = _peak(tb, ptr, best_order)
    out.seconds = time.time() - t_begin
    return out


def default_workers(num_tasks: int) -> int:
    """Two processes on a machine with two or more cores, one for tiny problems."""
    return 1 if num_tasks < 256 else min(2, os.cpu_count() or 1)


def run_in_processes(fn, jobs: list, timeout: float) -> list:
    """``fn(job)`` for every job: the first in this process, the others in spawned
    helper processes at the same time. A helper that cannot start or is lost gives
    ``None`` in its place (only its search is lost); without helpers every job but the
    first gives ``None``."""
    outcomes: list = [None] * len(jobs)
    pool, futures = None, []
    if len(jobs) > 1:
        try:
            pool = ProcessPoolExecutor(max_workers=len(jobs) - 1, mp_context=get_context("spawn"))
            futures = [pool.submit(fn, job) for job in jobs[1:]]
        except Exception:  # no child processes here (daemonic process, sandbox): search in this one
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            pool, futures = None, []
    try:
        outcomes[0] = fn(jobs[0])
        for i, fut in enumerate(futures, start=1):
            try:
                outcomes[i] = fut.result(timeout=timeout)
            except Exception:  # a lost helper process only costs its search
                outcomes[i] = None
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return outcomes


def search(problem: FusedProblem, table: TaskTable, start: Schedule, lower_bound: float, memory_floor: float,
           config: SearchConfig = SearchConfig(),
           low_memory_starts: list[tuple[np.ndarray, float, float]] = ()) -> list[SearchOutcome]:
    """Runs ``config.workers`` searches from ``start``; returns them best first.

    ``low_memory_starts``: ``(order, makespan, peak)`` of other starts (FIFO orders on
    ``start.node_ptr``), the Pareto front below ``start``'s peak: the memory probes
    anneal from the shortest of them within their cap."""
    workers = config.workers or default_workers(table.num_tasks)
    deadline = time.time() + config.time_limit
    seeds = np.random.SeedSequence(config.seed).generate_state(workers).tolist()
    jobs = [_Job(problem, table, start.node_ptr, start.order, lower_bound, memory_floor, int(s) % (2**31 - 1),
                 deadline, config, tuple(low_memory_starts)) for s in seeds]
    outcomes = run_in_processes(_run, jobs, timeout=max(30.0, config.time_limit + 30.0))
    eps = _tolerance(table)
    done = [o for o in outcomes if o is not None]
    done.sort(key=lambda o: (math.floor(o.makespan / eps), o.peak_memory))
    return done
