"""Constructive schedules: 1F1B per pipeline (the baseline) and the greedy fused start.

* :func:`one_f_one_b` -- each stage runs PipeDream-flush 1F1B (``min(S - s, M)``
  warm-up forwards, then one backward / one forward, then the remaining
  backwards) and each node runs the pipelines one after the other, in problem
  order. Where a node holds several stages of one pipeline, their sequences are
  merged in the order they would run if every stage had a device of its own.
* :func:`greedy_fused` -- RLHFuse §5's bidirectional greedy start, a list
  schedule (``fusedrl.kernels.schedule_eval.list_schedule``): all pipelines share
  every node and a free node runs, among the tasks ready, the one its rule
  prefers; ``inflight_slack`` caps how many micro-batches a stage holds, which
  keeps the start's memory near two 1F1B schedules side by side.
"""

from __future__ import annotations

import time

import numpy as np

from fusedrl.kernels import schedule_eval as ke

from .pipeline_problem import BACKWARD, FORWARD, FusedProblem, Schedule, TaskTable

_NO_CAP = np.iinfo(np.int64).max // 4


def stage_1f1b_sequence(num_stages: int, stage: int, microbatches: int) -> list[tuple[int, int]]:
    """The ``(kind, microbatch)`` sequence of one stage under 1F1B (PipeDream-flush)."""
    warm = min(num_stages - stage, microbatches)
    seq = [(FORWARD, m) for m in range(warm)]
    for m in range(microbatches - warm):
        seq += [(BACKWARD, m), (FORWARD, warm + m)]
    seq += [(BACKWARD, m) for m in range(microbatches - warm, microbatches)]
    return seq


def _pipeline_1f1b_times(problem: FusedProblem, table: TaskTable, p: int) -> np.ndarray:
    """Start times of pipeline ``p``'s tasks under 1F1B with one device per stage."""
    spec = problem.pipelines[p]
    lo, hi = int(table.offset[p]), int(table.offset[p + 1])
    seqs = [[table.task_id(p, m, s, k, problem) - lo for k, m in
             stage_1f1b_sequence(spec.num_stages, s, spec.microbatches)] for s in range(spec.num_stages)]
    sched = Schedule.from_node_orders(seqs)
    dep = np.where(table.dep[lo:hi] >= 0, table.dep[lo:hi] - lo, -1)
    succ = np.where(table.succ[lo:hi] >= 0, table.succ[lo:hi] - lo, -1)
    start, end = np.zeros(hi - lo), np.zeros(hi - lo)
    mk = ke.evaluate(sched.order, sched.positions(), sched.node_ptr, table.dur[lo:hi],
                     table.stage[lo:hi], dep, succ, start, end)
    assert mk >= 0, "1F1B deadlocked"
    return start


def pipeline_node_orders(problem: FusedProblem, table: TaskTable, p: int) -> list[np.ndarray]:
    """Pipeline ``p``'s 1F1B task order on every node (empty where it has no stage)."""
    lo = int(table.offset[p])
    times = _pipeline_1f1b_times(problem, table, p)
    ids = np.arange(lo, int(table.offset[p + 1]))
    orders = []
    for n in range(problem.nodes):
        mine = ids[table.node[ids] == n]
        orders.append(mine[np.argsort(times[mine - lo], kind="stable")])
    return orders


def one_f_one_b(problem: FusedProblem, table: TaskTable) -> Schedule:
    """1F1B for each pipeline, the pipelines one after the other on every node."""
    per_pipeline = [pipeline_node_orders(problem, table, p) for p in range(len(problem.pipelines))]
    return Schedule.from_node_orders(
        [np.concatenate([orders[n] for orders in per_pipeline]) for n in range(problem.nodes)])


def _class_layout(table: TaskTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class: node, paired backward class (forwards only, else -1); classes per node (CSR)."""
    first = table.class_first
    class_node = table.node[first]
    kind = table.kind[first]
    # The backward class of a forward class: same pipeline and stage, chain position mirrored.
    pair = np.full(first.shape[0], -1, dtype=np.int64)
    for c in np.flatnonzero(kind == FORWARD).tolist():
        t = int(first[c])
        p = int(table.pipeline[t])
        chain = int(table.class_stride[c])
        c0 = int(table.klass[table.offset[p]])
        pos = t - int(table.offset[p])
        pair[c] = c0 + chain - 1 - pos
    by_node = np.argsort(class_node, kind="stable")
    ptr = np.zeros(table.num_nodes + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(class_node, minlength=table.num_nodes))
    return class_node, pair, ptr, by_node.astype(np.int64)


def list_schedule(problem: FusedProblem, table: TaskTable, priority: np.ndarray,
                  inflight_slack: int | None = 0, node_cap: float = np.inf) -> Schedule | None:
    """Non-delay list schedule: a free node runs its ready task of lowest ``priority``.

    Ties go to the task released first, then to the larger model (more work per
    micro-batch), the lower pipeline index, backwards, lower micro-batch and stage.
    ``inflight_slack``: a stage admits a forward only while fewer than
    ``S - s + slack`` micro-batches are outstanding on it (1F1B holds ``S - s``);
    ``None`` admits all. ``node_cap`` caps the memory of the micro-batches
    outstanding on each node. Returns ``None`` if the caps deadlock.
    """
    class_node, pair, ptr, by_node = _class_layout(table)
    num_stages = np.array([p.num_stages for p in problem.pipelines])[table.pipeline[table.class_first]]
    stage = table.stage[table.class_first]
    cap = (np.full(pair.shape[0], _NO_CAP, dtype=np.int64) if inflight_slack is None
           else (num_stages - stage + inflight_slack).astype(np.int64))
    work = np.array([sum(p.fwd) + sum(p.bwd) for p in problem.pipelines])[table.pipeline]
    minor = np.lexsort((table.stage, table.microbatch, -table.kind, table.pipeline, -work)).argsort()
    order, node_ptr = ke.list_schedule(table.dur, table.node, table.succ, table.class_first,
                                       table.class_stride, table.class_count, class_node, pair, cap,
                                       table.memd[table.class_first], np.full(table.num_nodes, float(node_cap)),
                                       ptr, by_node, np.ascontiguousarray(priority, dtype=np.float64),
                                       minor.astype(np.float64))
    if order.shape[0] != table.num_tasks:
        return None
    return Schedule(order, node_ptr)


def paced_due_dates(problem: FusedProblem, table: TaskTable, target: float,
                    pace: np.ndarray) -> np.ndarray:
    """Due dates that spread each pipeline's micro-batches evenly over ``target``.

    Micro-batch ``k`` of pipeline ``p`` (``M`` in all) must leave task ``t`` by
    ``target - tail[t] - (M - 1 - k) * P_p``: the later micro-batches follow it at
    the pipeline's pace ``P_p = pace[p] * (target - chain_p) / M``, where
    ``chain_p`` is one micro-batch's work. ``pace = 1`` spreads a pipeline over
    the whole makespan; smaller values front-load it.
    """
    chain = np.array([sum(p.fwd) + sum(p.bwd) for p in problem.pipelines])
    M = np.array([p.microbatches for p in problem.pipelines])
    period = np.asarray(pace, dtype=np.float64) * np.maximum(target - chain, 0.0) / M
    p = table.pipeline
    return target - table.tails() - (M[p] - 1 - table.microbatch) * period[p]


def greedy_fused(problem: FusedProblem, table: TaskTable, rule: str = "ready",
                 inflight_slack: int | None = 0, backward_first: bool = False,
                 node_cap: float = np.inf) -> Schedule | None:
    """RLHFuse §5's greedy bidirectional schedule and a critical-path variant.

    ``rule="ready"``: the task ready earliest first, ties to the larger model (more
    work per micro-batch) -- the paper's rule. ``rule="tail"``: the task with the
    most work left in its micro-batch chain first (critical path first).
    ``backward_first`` puts ready backwards before forwards (1F1B's preference).
    Caps as in :func:`list_schedule`.
    """
    if rule not in ("ready", "tail"):
        raise ValueError(f"rule: expected 'ready' or 'tail', got {rule!r}")
    backward = (table.kind == BACKWARD).astype(np.float64)
    major = -backward if backward_first else np.zeros(table.num_tasks)
    if rule == "tail":
        major = major * (table.dur.sum() + 1.0) - table.tails()
    return list_schedule(problem, table, major, inflight_slack, node_cap)


PACES = (0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


def start_candidates(problem: FusedProblem, table: TaskTable, target: float,
                     memory_cap: float = np.inf, deadline: float | None = None) -> list[tuple[str, Schedule]]:
    """Starting schedules for the search, named by how they were built.

    Earliest-due-date list schedules under :func:`paced_due_dates` (``pace``), over a
    grid of paces for the pipelines with the most work per micro-batch and for the
    others; the paper's greedy (``ready``) and the critical-path rule (``tail``), each
    backward-first or not. Each with 1F1B's in-flight counts per stage plus 0, 1, 2
    or 4, or none, and with the node memory capped at ``memory_cap`` or not. Variants
    whose caps deadlock are left out. Last, :func:`serial_schedule` two ways: it
    needs the least memory any schedule can have, so some start fits every feasible
    cap. Past ``deadline`` (a ``time.time()`` value) no more list schedules are built
    (on large problems they take tens of milliseconds each); the variants that most
    often start the search at the bound come first (no in-flight cap, or 4 over 1F1B).
    """
    caps = list(dict.fromkeys((np.inf, memory_cap)))
    admissions = [(slack, cap) for slack in (None, 4, 2, 1, 0) for cap in caps]
    work = np.array([sum(p.fwd) + sum(p.bwd) for p in problem.pipelines])
    big = work >= work.max()
    paces = list(dict.fromkeys((a, b) for a in PACES for b in (PACES if not big.all() else (a,))))
    builders = []
    for slack, cap in admissions:
        for a, b in paces:
            builders.append((f"pace={a},{b}/slack={slack}/cap={cap}",
                             lambda a=a, b=b, slack=slack, cap=cap: list_schedule(
                                 problem, table, paced_due_dates(problem, table, target, np.where(big, a, b)),
                                 slack, cap)))
        for rule in ("ready", "tail"):
            for backward_first in (False, True):
                builders.append((f"{rule}{'/bwd-first' if backward_first else ''}/slack={slack}/cap={cap}",
                                 lambda rule=rule, bf=backward_first, slack=slack, cap=cap: greedy_fused(
                                     problem, table, rule, slack, bf, cap)))
    # The paper's greedy (RLHFuse §5) first: reports compare against it.
    builders.sort(key=lambda nb: not nb[0].startswith("ready/slack=0/"))
    out = []
    for name, build in builders:
        if deadline is not None and out and time.time() > deadline:
            break
        s = build()
        if s is not None:
            out.append((name, s))
    out += [(f"serial/{how}", serial_schedule(table, interleave=how == "interleaved"))
            for how in ("pipelines", "interleaved")]
    return out


def serial_schedule(table: TaskTable, interleave: bool = False) -> Schedule:
    """One micro-batch at a time: the least memory any schedule can have.

    Micro-batches run pipeline after pipeline, or (``interleave``) interleaved in
    proportion to the pipelines' micro-batch counts.
    """
    M = table.class_count[table.klass]
    chain_rank = (table.microbatch / M, table.pipeline) if interleave else (table.pipeline, table.microbatch)
    # A task's place: its chain's rank, then its place in the chain (task ids run along chains).
    order = np.lexsort((np.arange(table.num_tasks),) + chain_rank[::-1])
    return Schedule.from_node_orders([order[table.node[order] == n] for n in range(table.num_nodes)])


__all__ = ["greedy_fused", "list_schedule", "one_f_one_b", "paced_due_dates", "pipeline_node_orders",
           "serial_schedule", "stage_1f1b_sequence", "start_candidates"]
