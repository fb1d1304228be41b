"""The fused pipeline schedule problem and its result format (RLHFuse §5).

Intra-stage fusion runs several training pipelines (the actor's and the critic's,
possibly several replicas of one) on the same nodes; one fused schedule orders all
their micro-batch tasks on every node. This module holds the contract of docs/design.md
"Fused schedule problem":

* input: ``{"nodes": N, "pipelines": [{"name", "stage_nodes", "microbatches",
  "fwd", "bwd", "mem"}, ...]}`` -- ``fwd``/``bwd``/``mem`` are a number or a list
  with one entry per stage (``mem`` defaults to 1);
* output: ``{"makespan", "lower_bound", "peak_memory", "bubble_ratio", "tasks":
  [{"node", "pipeline", "microbatch", "stage", "kind", "start", "end"}, ...]}``.

Internally every task gets an integer id and the problem becomes flat arrays
(:class:`TaskTable`), the form the evaluation kernels of
``fusedrl.kernels.schedule_eval`` work on. Each micro-batch is a chain of ``2*S``
tasks: forward on stages ``0..S-1``, then backward on stages ``S-1..0``; task id
``offset[p] + m*2*S + c`` is chain position ``c`` of micro-batch ``m`` of pipeline
``p``. A *schedule* is one task order per node (``order`` concatenated over nodes,
``node_ptr`` the offsets), start times follow from the orders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORWARD, BACKWARD = 0, 1
KIND_NAMES = ("F", "B")

_PIPELINE_KEYS = {"name", "stage_nodes", "microbatches", "fwd", "bwd", "mem"}
_PROBLEM_KEYS = {"nodes", "pipelines"}


@dataclass(frozen=True)
class PipelineSpec:
    """One training pipeline: stage ``s`` runs on node ``stage_nodes[s]``."""

    name: str
    stage_nodes: tuple[int, ...]
    microbatches: int
    fwd: tuple[float, ...]  # per stage, one micro-batch
    bwd: tuple[float, ...]
    mem: tuple[float, ...]  # activation memory a forwarded micro-batch holds, per stage

    @property
    def num_stages(self) -> int:
        return len(self.stage_nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage_nodes": list(self.stage_nodes),
            "microbatches": self.microbatches,
            "fwd": list(self.fwd),
            "bwd": list(self.bwd),
            "mem": list(self.mem),
        }


@dataclass(frozen=True)
class FusedProblem:
    """Pipelines sharing ``nodes`` devices; the input of the fused schedule search."""

    nodes: int
    pipelines: tuple[PipelineSpec, ...]

    @classmethod
    def from_dict(cls, data: Any) -> "FusedProblem":
        """Validates ``data`` (the JSON problem) and builds the problem.

        Raises ``ValueError`` naming the offending field and value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"problem: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _PROBLEM_KEYS)
        if unknown:
            raise ValueError(f"problem: unknown field(s) {unknown}; expected {sorted(_PROBLEM_KEYS)}")
        if "nodes" not in data:
            raise ValueError("problem: missing field 'nodes'")
        nodes = _positive_int(data["nodes"], "nodes")
        pipes = data.get("pipelines")
        if not isinstance(pipes, list) or not pipes:
            raise ValueError(f"pipelines: expected a non-empty list, got {pipes!r}")
        specs = tuple(_parse_pipeline(p, i, nodes) for i, p in enumerate(pipes))
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pipelines: duplicate name(s) {dup}")
        return cls(nodes=nodes, pipelines=specs)

    @classmethod
    def from_json(cls, path: str | Path) -> "FusedProblem":
        """Reads and validates a problem file (``ValueError`` on bad JSON too)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read problem file ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "pipelines": [p.to_dict() for p in self.pipelines]}

    @property
    def total_work(self) -> float:
        """Sum of all task durations."""
        return sum(p.microbatches * (sum(p.fwd) + sum(p.bwd)) for p in self.pipelines)


def _positive_int(value: Any, field: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value != int(value)):
        raise ValueError(f"{field}: expected a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{field}: must be at least 1, got {value!r}")
    return int(value)


def _per_stage(value: Any, field: str, stages: int, *, allow_zero: bool) -> tuple[float, ...]:
    """A number or a list of ``stages`` numbers -> tuple of finite floats."""
    values = value if isinstance(value, list) else [value] * stages
    if len(values) != stages:
        raise ValueError(f"{field}: expected {stages} values (one per stage), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: expected a finite number, got {v!r}")
        if v < 0 or (v == 0 and not allow_zero):
            need = "non-negative" if allow_zero else "positive"
            raise ValueError(f"{where}: must be {need}, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _parse_pipeline(data: Any, index: int, nodes: int) -> PipelineSpec:
    where = f"pipelines[{index}]"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - _PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected {sorted(_PIPELINE_KEYS)}")
    for key in ("stage_nodes", "microbatches", "fwd", "bwd"):
        if key not in data:
            raise ValueError(f"{where}: missing field '{key}'")
    name = data.get("name", f"pipeline{index}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
    stage_nodes = data["stage_nodes"]
    if not isinstance(stage_nodes, list) or not stage_nodes:
        raise ValueError(f"{where}.stage_nodes: expected a non-empty list of node ids, got {stage_nodes!r}")
    for s, n in enumerate(stage_nodes):
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"{where}.stage_nodes[{s}]: expected a node id, got {n!r}")
        if not 0 <= n < nodes:
            raise ValueError(
                f"{where}.stage_nodes[{s}]: stage {s} is mapped to node {n}, "
                f"but nodes are 0..{nodes - 1}"
            )
    stages = len(stage_nodes)
    microbatches = _positive_int(data["microbatches"], f"{where}.microbatches")
    return PipelineSpec(
        name=name,
        stage_nodes=tuple(stage_nodes),
        microbatches=microbatches,
        fwd=_per_stage(data["fwd"], f"{where}.fwd", stages, allow_zero=False),
        bwd=_per_stage(data["bwd"], f"{where}.bwd", stages, allow_zero=False),
        mem=_per_stage(data.get("mem", 1.0), f"{where}.mem", stages, allow_zero=True),
    )


@dataclass(frozen=True)
class TaskTable:
    """Flat per-task arrays of a :class:`FusedProblem` (task ids as in the module doc).

    ``dep[t]`` is the task ``t`` waits for (the previous one in its micro-batch
    chain, -1 for the first forward), ``succ[t]`` the one waiting for ``t`` (-1 for
    the last backward); ``memd[t]`` is ``+mem`` for a forward and ``-mem`` for a
    backward.
    """

    num_nodes: int
    offset: np.ndarray  # [P+1] first task id of each pipeline
    pipeline: np.ndarray  # [T]
    microbatch: np.ndarray
    stage: np.ndarray
    kind: np.ndarray
    node: np.ndarray
    dur: np.ndarray  # float64
    dep: np.ndarray
    succ: np.ndarray
    memd: np.ndarray  # float64
    klass: np.ndarray  # [T] id of the task's (pipeline, stage, kind) class
    class_first: np.ndarray  # [C] task id of micro-batch 0 of the class
    class_stride: np.ndarray  # [C] id distance between consecutive micro-batches
    class_count: np.ndarray  # [C] micro-batches

    @property
    def num_tasks(self) -> int:
        return int(self.dur.shape[0])

    @classmethod
    def build(cls, problem: FusedProblem) -> "TaskTable":
        cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                             ("pipeline", "microbatch", "stage", "kind", "node", "dur", "memd")}
        offset = [0]
        for p, spec in enumerate(problem.pipelines):
            S, M = spec.num_stages, spec.microbatches
            chain = np.arange(2 * S)
            stage = np.where(chain < S, chain, 2 * S - 1 - chain)
            kind = (chain >= S).astype(np.int64)
            fwd, bwd, mem = np.array(spec.fwd), np.array(spec.bwd), np.array(spec.mem)
            cols["pipeline"].append(np.full(2 * S * M, p))
            cols["microbatch"].append(np.repeat(np.arange(M), 2 * S))
            cols["stage"].append(np.tile(stage, M))
            cols["kind"].append(np.tile(kind, M))
            cols["node"].append(np.tile(np.array(spec.stage_nodes)[stage], M))
            cols["dur"].append(np.tile(np.where(kind == FORWARD, fwd[stage], bwd[stage]), M))
            cols["memd"].append(np.tile(np.where(kind == FORWARD, mem[stage], -mem[stage]), M))
            offset.append(offset[-1] + 2 * S * M)
        arr = {k: np.concatenate(v) for k, v in cols.items()}
        T = offset[-1]
        ids = np.arange(T)
        chain_pos = np.zeros(T, dtype=np.int64)
        chain_len = np.zeros(T, dtype=np.int64)
        for p, spec in enumerate(problem.pipelines):
            lo, hi = offset[p], offset[p + 1]
            chain_pos[lo:hi] = (ids[lo:hi] - lo) % (2 * spec.num_stages)
            chain_len[lo:hi] = 2 * spec.num_stages
        # Tasks of one class differ only in their micro-batch: class = (pipeline, chain position).
        klass = np.zeros(T, dtype=np.int64)
        first, stride, count = [], [], []
        for p, spec in enumerate(problem.pipelines):
            lo, hi = offset[p], offset[p + 1]
            klass[lo:hi] = len(first) + chain_pos[lo:hi]
            first += range(lo, lo + 2 * spec.num_stages)
            stride += [2 * spec.num_stages] * (2 * spec.num_stages)
            count += [spec.microbatches] * (2 * spec.num_stages)
        dep = np.where(chain_pos > 0, ids - 1, -1)
        succ = np.where(chain_pos < chain_len - 1, ids + 1, -1)
        i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
        f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
        return cls(
            num_nodes=problem.nodes, offset=i64(offset), pipeline=i64(arr["pipeline"]),
            microbatch=i64(arr["microbatch"]), stage=i64(arr["stage"]), kind=i64(arr["kind"]),
            node=i64(arr["node"]), dur=f64(arr["dur"]), dep=i64(dep), succ=i64(succ),
            memd=f64(arr["memd"]), klass=i64(klass), class_first=i64(first),
            class_stride=i64(stride), class_count=i64(count),
        )

    def tails(self) -> np.ndarray:
        """Per task: the work left in its micro-batch chain after it ends."""
        q = np.zeros(self.num_tasks)
        for p in range(len(self.offset) - 1):
            lo, hi = int(self.offset[p]), int(self.offset[p + 1])
            if hi == lo:
                continue
            chain = int(np.flatnonzero(self.succ[lo:hi] < 0)[0]) + 1
            d = self.dur[lo:hi].reshape(-1, chain)
            after = np.cumsum(d[:, ::-1], axis=1)[:, ::-1] - d
            q[lo:hi] = after.ravel()
        return q

    def task_id(self, pipeline: int, microbatch: int, stage: int, kind: int, problem: FusedProblem) -> int:
        """Id of one task (inverse of the per-task columns)."""
        S = problem.pipelines[pipeline].num_stages
        c = stage if kind == FORWARD else 2 * S - 1 - stage
        return int(self.offset[pipeline] + microbatch * 2 * S + c)


@dataclass
class Schedule:
    """Per-node task orders: node ``n`` runs ``order[node_ptr[n]:node_ptr[n+1]]``."""

    order: np.ndarray
    node_ptr: np.ndarray

    @classmethod
    def from_node_orders(cls, orders: Sequence[Sequence[int]]) -> "Schedule":
        ptr = np.zeros(len(orders) + 1, dtype=np.int64)
        ptr[1:] = np.cumsum([len(o) for o in orders])
        flat = np.concatenate([np.asarray(o, dtype=np.int64) for o in orders]) if orders else np.zeros(0, np.int64)
        return cls(order=np.ascontiguousarray(flat, dtype=np.int64), node_ptr=ptr)

    def node_orders(self) -> list[np.ndarray]:
        return [self.order[self.node_ptr[n]:self.node_ptr[n + 1]] for n in range(len(self.node_ptr) - 1)]

    def positions(self) -> np.ndarray:
        pos = np.empty_like(self.order)
        pos[self.order] = np.arange(self.order.shape[0])
        return pos

    def copy(self) -> "Schedule":
        return Schedule(self.order.copy(), self.node_ptr.copy())


def node_ptr_for(table: TaskTable) -> np.ndarray:
    """Offsets of each node's slice in a flat order (task counts per node)."""
    counts = np.bincount(table.node, minlength=table.num_nodes)
    ptr = np.zeros(table.num_nodes + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(counts)
    return ptr


def fifo_relabel(table: TaskTable, schedule: Schedule) -> Schedule:
    """The same per-node class sequence with each class's micro-batches in order.

    The micro-batches of a pipeline are identical, so a schedule is determined,
    up to relabelling, by the sequence of ``(pipeline, stage, kind)`` classes each
    node runs. Giving the ``k``-th task of a class on a node micro-batch ``k``
    (first in, first out) never delays a task: when the ``k``-th task of a class
    starts, ``k`` micro-batches have finished the class upstream of it, so the
    ``k``-th upstream task has too. Searching FIFO orders only, and never swapping
    two tasks of one class, removes the micro-batch permutations from the search.
    """
    cls = table.klass[schedule.order]
    rank = np.zeros_like(cls)
    seen = np.zeros_like(table.class_first)
    for k, c in enumerate(cls.tolist()):
        rank[k] = seen[c]
        seen[c] += 1
    order = table.class_first[cls] + rank * table.class_stride[cls]
    return Schedule(np.ascontiguousarray(order), schedule.node_ptr.copy())


def check_schedule_shape(table: TaskTable, schedule: Schedule) -> None:
    """Every task exactly once, on its own node (``ValueError`` otherwise)."""
    T = table.num_tasks
    if schedule.order.shape != (T,) or len(schedule.node_ptr) != table.num_nodes + 1:
        raise ValueError(f"schedule: expected {T} tasks over {table.num_nodes} nodes")
    if not np.array_equal(np.sort(schedule.order), np.arange(T)):
        raise ValueError("schedule: every task must appear exactly once")
    for n, o in enumerate(schedule.node_orders()):
        wrong = o[table.node[o] != n]
        if wrong.size:
            raise ValueError(f"schedule: task {int(wrong[0])} placed on node {n}, belongs to node "
                             f"{int(table.node[wrong[0]])}")


def tasks_to_records(problem: FusedProblem, table: TaskTable, schedule: Schedule,
                     start: np.ndarray, end: np.ndarray) -> list[dict[str, Any]]:
    """The ``tasks`` list of the result format, node by node in execution order."""
    names = [p.name for p in problem.pipelines]
    out = []
    for n, o in enumerate(schedule.node_orders()):
        for t in o.tolist():
            out.append({
                "node": n,
                "pipeline": names[table.pipeline[t]],
                "microbatch": int(table.microbatch[t]),
                "stage": int(table.stage[t]),
                "kind": KIND_NAMES[table.kind[t]],
                "start": float(start[t]),
                "end": float(end[t]),
            })
    return out
