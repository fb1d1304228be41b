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
"""

from __future__ import annotations

from dataclasses import dataclass

from .pipeline_problem import FusedProblem


@dataclass(frozen=True)
class LowerBound:
    """The bound (``value``) and its parts, for reports."""

    value: float
    node: float  # RLHFuse per-node bound, max over nodes
    critical_path: float  # max over pipelines
    average_work: float  # total work / nodes
    node_subsets: float  # Jackson subset bound, max over nodes

    def to_dict(self) -> dict[str, float]:
        return dict(value=self.value, node=self.node, critical_path=self.critical_path,
                    average_work=self.average_work, node_subsets=self.node_subsets)


def _task_classes(problem: FusedProblem) -> list[list[tuple[float, float, float]]]:
    """Per node: ``(head, total work, tail)`` of each (pipeline, stage, kind) class."""
    classes: list[list[tuple[float, float, float]]] = [[] for _ in range(problem.nodes)]
    for spec in problem.pipelines:
        f, b, M = spec.fwd, spec.bwd, spec.microbatches
        total_f, total_b = sum(f), sum(b)
        for s, n in enumerate(spec.stage_nodes):
            f_before, b_before = sum(f[:s]), sum(b[:s])
            f_after, b_after = total_f - f_before - f[s], total_b - b_before - b[s]
            classes[n].append((f_before, M * f[s], f_after + total_b))  # forward of stage s
            classes[n].append((total_f + b_after, M * b[s], b_before))  # backward of stage s
    return classes


def critical_path(problem: FusedProblem) -> float:
    """Max over pipelines and stages of head + stage work + tail (one pipeline alone)."""
    best = 0.0
    for spec in problem.pipelines:
        f, b, M = spec.fwd, spec.bwd, spec.microbatches
        for s in range(spec.num_stages):
            best = max(best, sum(f[:s]) + M * (f[s] + b[s]) + sum(b[:s]))
    return best


def lower_bound(problem: FusedProblem) -> LowerBound:
    """All bounds of the module doc; ``value`` is the largest."""
    node_lb = subset_lb = 0.0
    for cls in _task_classes(problem):
        if not cls:
            continue
        node_lb = max(node_lb, min(c[0] for c in cls) + sum(c[1] for c in cls) + min(c[2] for c in cls))
        for r0 in {c[0] for c in cls}:
            for q0 in {c[2] for c in cls}:
                work = sum(c[1] for c in cls if c[0] >= r0 and c[2] >= q0)
                if work > 0:
                    subset_lb = max(subset_lb, r0 + work + q0)
    cp = critical_path(problem)
    avg = problem.total_work / problem.nodes
    return LowerBound(value=max(node_lb, cp, avg, subset_lb), node=node_lb, critical_path=cp,
                      average_work=avg, node_subsets=subset_lb)
