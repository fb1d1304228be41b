"""Lower bounds on the makespan of a fused pipeline schedule (RLHFuse §5).

Every task ``t`` of a micro-batch chain has a *head* ``r`` (the least time before
it can start: the chain's tasks before it) and a *tail* ``q`` (the least time
after it ends: the chain's tasks after it). RLHFuse §5 bounds the makespan by

* per node: earliest head of its tasks + all its work + shortest tail;
* per pipeline: its critical path, ``(M + S - 1)(f + b)`` for uniform stages
  (the bottleneck stage's work plus the head and tail around it);
* the total work divided by the number of nodes.

We also take the one-machine relaxation with heads and tails on every node:
for every subset of its tasks, ``min r + sum of work + min q`` is a lower bound
(the preemptive Jackson bound, Carlier 1982). Tasks of one ``(pipeline, stage,
kind)`` share ``r`` and ``q``, so the maximum over subsets only needs the
threshold pairs ``(r0, q0)`` of those classes. It contains the per-node bound
(all tasks) and each pipeline's critical path (one stage's forwards and
backwards), and can be larger than both.

**Memory.** Under a per-node memory cap ``C`` a node can run only forwards until
the earliest head ``a_B`` of its backwards, and no more of them than ``C`` holds
(a fractional knapsack of forward work under ``C`` bounds that work, ``WF``);
symmetrically, after ``makespan - b_F`` (``b_F``: the shortest tail of its
forwards) it runs only backwards, at most the ``C`` outstanding ones (``WB``).
So the node's other work, if any is left, must fit between ``a_B`` and
``makespan - b_F``::

    makespan >= a_B + b_F + W - min(a_B - a_F, WF) - min(b_F - b_B, WB)   (if W > the two mins)

E.g. a 16-stage actor fused with a reversed 16-stage critic (64 micro-batches
each, b = 2f) has a plain bound of 405f, but within the memory of two 1F1B
schedules side by side (17 micro-batches per node) no schedule beats 411f: the
middle nodes cannot fill the 23f before their first backward with 17 forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .pipeline_problem import FusedProblem


@dataclass(frozen=True)
class LowerBound:
    """The bound (``value``) and its parts, for reports."""

    value: float
    node: float  # RLHFuse per-node bound, max over nodes
    critical_path: float  # max over pipelines
    average_work: float  # total work / nodes
    node_subsets: float  # Jackson subset bound, max over nodes
    memory: float  # bound under the memory cap (0 without one)
    memory_cap: float

    @property
    def plain(self) -> float:
        """RLHFuse §5's bound: per node, per pipeline, average work."""
        return max(self.node, self.critical_path, self.average_work)

    def gap_reason(self) -> str | None:
        """Why ``plain`` is provably unreachable (``value`` above it), or ``None``."""
        if self.value <= self.plain * (1 + 1e-12):
            return None
        parts = []
        if self.node_subsets > self.plain * (1 + 1e-12):
            parts.append(f"a subset of one node's tasks needs {self.node_subsets:g} (earliest head + "
                         "work + shortest tail of the tasks that cannot start before / end after it)")
        if self.memory > max(self.plain, self.node_subsets) * (1 + 1e-12):
            parts.append(f"within the memory cap {self.memory_cap:g} a node cannot hold enough forwards "
                         f"before its first backward: {self.memory:g}")
        return (f"RLHFuse's bound {self.plain:g} is unreachable: " + "; ".join(parts)) if parts else None

    def to_dict(self) -> dict[str, float]:
        return dict(value=self.value, plain=self.plain, node=self.node, critical_path=self.critical_path,
                    average_work=self.average_work, node_subsets=self.node_subsets,
                    memory=self.memory, memory_cap=self.memory_cap)


@dataclass(frozen=True)
class _Class:
    """The ``count`` tasks of one (pipeline, stage, kind) on a node."""

    head: float
    tail: float
    dur: float
    count: int
    mem: float
    forward: bool

    @property
    def work(self) -> float:
        return self.count * self.dur


def _task_classes(problem: FusedProblem) -> list[list[_Class]]:
    """Per node, its task classes with their heads and tails: each stage's forward class,
    then its backward class."""
    classes: list[list[_Class]] = [[] for _ in range(problem.nodes)]
    for spec in problem.pipelines:
        f, b, M = spec.fwd, spec.bwd, spec.microbatches
        total_f, total_b = sum(f), sum(b)
        for s, n in enumerate(spec.stage_nodes):
            f_before, b_before = sum(f[:s]), sum(b[:s])
            f_after, b_after = total_f - f_before - f[s], total_b - b_before - b[s]
            classes[n].append(_Class(f_before, f_after + total_b, f[s], M, spec.mem[s], True))
            classes[n].append(_Class(total_f + b_after, b_before, b[s], M, spec.mem[s], False))
    return classes


def _knapsack_work(classes: list[_Class], cap: float) -> float:
    """Most work of these tasks whose memory fits in ``cap`` (fractional: an upper bound)."""
    free = sum(c.work for c in classes if c.mem <= 0)
    left = cap
    for c in sorted((c for c in classes if c.mem > 0), key=lambda c: c.dur / c.mem, reverse=True):
        take = min(c.count, left / c.mem)
        free += take * c.dur
        left -= take * c.mem
        if left <= 0:
            break
    return free


def _memory_bound(cls: list[_Class], cap: float) -> float:
    """The node bound under a memory cap (module doc)."""
    fwd = [c for c in cls if c.forward]
    bwd = [c for c in cls if not c.forward]
    a_f, a_b = min(c.head for c in fwd), min(c.head for c in bwd)
    b_f, b_b = min(c.tail for c in fwd), min(c.tail for c in bwd)
    work = sum(c.work for c in cls)
    early = min(a_b - a_f, _knapsack_work(fwd, cap))
    late = min(b_f - b_b, _knapsack_work(bwd, cap))
    middle = work - early - late  # work that must run in [a_B, makespan - b_F]
    return a_b + b_f + middle if middle > 0 else 0.0


def critical_path(problem: FusedProblem) -> float:
    """Max over pipelines and stages of head + stage work + tail (one pipeline alone)."""
    best = 0.0
    for spec in problem.pipelines:
        f, b, M = spec.fwd, spec.bwd, spec.microbatches
        for s in range(spec.num_stages):
            best = max(best, sum(f[:s]) + M * (f[s] + b[s]) + sum(b[:s]))
    return best


def lower_bound(problem: FusedProblem, memory_cap: float = math.inf) -> LowerBound:
    """All bounds of the module doc; ``value`` is the largest.

    ``memory_cap``: the peak memory every schedule considered must stay within.
    """
    node_lb = subset_lb = mem_lb = 0.0
    for cls in _task_classes(problem):
        if not cls:
            continue
        node_lb = max(node_lb, min(c.head for c in cls) + sum(c.work for c in cls) + min(c.tail for c in cls))
        for r0 in {c.head for c in cls}:
            for q0 in {c.tail for c in cls}:
                work = sum(c.work for c in cls if c.head >= r0 and c.tail >= q0)
                if work > 0:
                    subset_lb = max(subset_lb, r0 + work + q0)
        if math.isfinite(memory_cap):
            mem_lb = max(mem_lb, _memory_bound(cls, memory_cap))
    cp = critical_path(problem)
    avg = problem.total_work / problem.nodes
    return LowerBound(value=max(node_lb, cp, avg, subset_lb, mem_lb), node=node_lb, critical_path=cp,
                      average_work=avg, node_subsets=subset_lb, memory=mem_lb, memory_cap=memory_cap)


@dataclass(frozen=True)
class _StageOnNode:
    """One (pipeline, stage) on a node: its forward and backward classes."""

    head_f: float
    f: float
    tail_f: float
    head_b: float
    b: float
    tail_b: float
    mem: float
    count: int


def _stages_on_node(classes: list[_Class]) -> list[_StageOnNode]:
    """A node's classes (:func:`_task_classes`: each stage's forward, then its backward)
    paired by stage."""
    return [_StageOnNode(head_f=fc.head, f=fc.dur, tail_f=fc.tail, head_b=bc.head, b=bc.dur, tail_b=bc.tail,
                         mem=fc.mem, count=fc.count) for fc, bc in zip(classes[0::2], classes[1::2])]


def _held_at(stages: list[_StageOnNode], t: float, busy: float, makespan: float, tol: float,
             strict: bool) -> float:
    """The least memory a node holds at time ``t`` (:func:`_forced_outstanding`).

    Per stage, ``nF`` forwards and ``nB <= nF`` backwards have started by ``t``: at
    most the releases up to ``t`` (``strict``: before ``t``, the left limit), and at
    least the forwards whose successors on the node cannot otherwise end by
    ``makespan - tail_F``; their work is at least ``busy``. The node holds
    ``sum mem (nF - nB)``: backwards up to their releases cost nothing, the rest of
    the work comes from further forwards, least memory per unit of work first (a
    fractional knapsack, so a lower bound on the integer minimum).
    """
    def released(first: float, step: float, m: int) -> int:  # of first, first + step, ... by t
        x = (t - first) / step
        k = math.ceil(x - tol) if strict else math.floor(x + tol) + 1
        return min(m, max(0, k))

    held, work, more = 0.0, 0.0, []
    for st in stages:
        can_f, can_b = released(st.head_f, st.f, st.count), released(st.head_b, st.b, st.count)
        # Forwards not started by t all run after it and the last ends by makespan - tail_F.
        left = (makespan - st.tail_f - t) / st.f
        must_f = st.count - max(0, math.floor(left + tol))
        lo = max(must_f, min(can_f, can_b))
        held += st.mem * max(0, lo - can_b)
        work += st.f * lo + st.b * min(lo, can_b)
        if can_f > lo:
            more.append((st.mem / st.f, st.f, st.mem, can_f - lo))
    short = busy - work
    for _, f, mem, k in sorted(more):
        if short <= tol:
            break
        take = min(k, short / f)
        held += take * mem
        short -= take * f
    return held


def _forced_outstanding(problem: FusedProblem, makespan: float) -> float:
    """Memory some node must hold at some moment in every schedule ending by ``makespan``.

    A node's tasks all start after its earliest head ``a`` and end by ``makespan - q``
    (``q``: its shortest tail), so it idles at most ``slack = makespan - a - q - W``
    (``W``: its work) and has started at least ``t - a - slack`` work by any time
    ``t``. Of a stage's tasks at most those released by ``t`` have started (the
    ``k``-th forward at ``head_F + k f`` at the earliest, likewise backwards), and at
    least the forwards that cannot all run after ``t``. Started forwards without a
    started backward hold their memory, so the least memory that meets these counts
    (:func:`_held_at`) is a lower bound at ``t``. Between two release times it only
    grows, so the maximum is taken at every release time and just before it.
    """
    tol = 1e-9 * max(1.0, makespan)
    best = 0.0
    for cls in _task_classes(problem):
        stages = _stages_on_node(cls)
        if not stages or all(st.mem <= 0 for st in stages):
            continue
        first = min(st.head_f for st in stages)
        end = makespan - min(min(st.tail_f, st.tail_b) for st in stages)
        slack = end - first - sum(st.count * (st.f + st.b) for st in stages)
        if slack < -tol:
            continue  # shorter than this node's bound: no schedule to bound
        times = {end}
        for st in stages:
            k = np.arange(st.count)
            times.update((st.head_f + k * st.f).tolist())
            times.update((st.head_b + k * st.b).tolist())
            times.update((makespan - st.tail_f - (st.count - k) * st.f).tolist())
        for t in sorted(times):
            if first <= t <= end:
                for strict in (True, False):
                    best = max(best, _held_at(stages, t, t - first - slack, makespan, tol, strict))
    return best


def memory_lower_bound(problem: FusedProblem, makespan: float) -> float:
    """No schedule that ends by ``makespan`` has a lower peak memory.

    The memory bound of the module doc inverted: the node bound under a cap ``C``
    only falls as ``C`` grows, so the least ``C`` (found by bisection) at which it is
    within ``makespan`` on every node bounds the peak of every schedule that short;
    no schedule holds less than one micro-batch's stages on a node
    (``memory_floor``); and none less than a node must hold when, by some time, it has
    started more work than its released backwards can pair (:func:`_forced_outstanding`).
    """
    floor = 0.0
    per_node = [0.0] * problem.nodes
    for spec in problem.pipelines:
        held = [0.0] * problem.nodes
        for n, m in zip(spec.stage_nodes, spec.mem):
            held[n] += m
        per_node = [max(a, b) for a, b in zip(per_node, held)]
    floor = max(per_node)
    best = max(floor, _forced_outstanding(problem, makespan))
    tol = 1e-9 * max(1.0, makespan)
    for cls in _task_classes(problem):
        if not cls:
            continue
        lo, hi = 0.0, sum(c.count * c.mem for c in cls if c.forward)
        if _memory_bound(cls, hi) > makespan + tol or _memory_bound(cls, best) <= makespan + tol:
            continue  # no cap helps (makespan below the plain bound), or ``best`` already fits
        lo = best
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _memory_bound(cls, mid) <= makespan + tol:
                hi = mid
            else:
                lo = mid
        best = max(best, lo)
    return best
