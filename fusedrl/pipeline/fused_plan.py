"""Planning of fused actor/critic training (RLHFuse §5, after Chimera): which node
holds which stage, the schedule problem built from profiled stage times, and the
per-node task lists the executor (:mod:`fusedrl.pipeline.fused`) runs. No torch here:
the config validates ``placement.train_schedule: fused`` with :func:`stage_map`.

A **node** is one stage of the actor's pipeline in a data-parallel replica, i.e. the
tp group of devices ``actor_train`` puts at stage ``s``: node ``s``. The critic's
stage ``c`` must sit on exactly the devices of some actor stage, ``stage_map[c]``
(RLHFuse's layout reverses it, ``stage_map = [pp-1, ..., 0]``, so the two pipelines'
bubbles fall on opposite ends and fill each other; any permutation is accepted). All
dp replicas must use the same permutation, so that one schedule serves them all.

Problem (docs/design.md "Fused schedule problem")::

    {"nodes": pp, "pipelines": [
        {"name": "actor", "stage_nodes": [0, ..., pp-1], "microbatches": m_a,
         "fwd": [...], "bwd": [...], "mem": [...]},
        {"name": "critic", "stage_nodes": stage_map, "microbatches": m_c, ...}]}

Its solution's ``tasks`` become, per node, a list of :class:`Task` in execution order.

Memory: the solver finds the shortest schedule first, then the lowest peak memory at
that makespan (RLHFuse §5). Given the bytes each node's device has free for
activations (:func:`fusedrl.runtime.memory.device_memory`, after weights, gradients
and optimizer state), :func:`memory_cap` gives the real bound, a hard constraint of
both phases (:func:`solver_memory_cap`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

MEM_UNIT = 2 ** 20
"""Bytes per memory unit of the schedule problem (:func:`build_problem` writes MiB)."""

PIPELINES = ("actor", "critic")
"""Pipeline index 0 trains the actor (``actor_train``), 1 the critic (``critic_train``)."""


class Task(NamedTuple):
    """One unit of work on a node: forward (``kind == "F"``) or backward of micro-batch
    ``microbatch`` (index among this dp replica's micro-batches) through ``stage``."""

    pipeline: int
    microbatch: int
    stage: int
    kind: str


def stage_map(actor, critic) -> tuple[int, ...]:
    """For two :class:`~fusedrl.layout.Placement`, the actor stage (node) holding each
    critic stage; ``ValueError`` saying why they cannot be fused otherwise."""
    A, C = actor.layout, critic.layout
    if (A.dp, A.tp, A.pp) != (C.dp, C.tp, C.pp):
        raise ValueError(f"fused training needs actor_train and critic_train with the same "
                         f"dp/tp/pp degrees, got {A} and {C}")
    if set(actor.devices) != set(critic.devices):
        raise ValueError(f"fused training needs actor_train ({actor}) and critic_train "
                         f"({critic}) on the same devices")
    result: tuple[int, ...] | None = None
    for d in range(A.dp):
        node_of = {frozenset(actor.devices[r] for r in A.tp_group_ranks(d, s)): s
                   for s in range(A.pp)}
        perm = []
        for s in range(C.pp):
            devs = frozenset(critic.devices[r] for r in C.tp_group_ranks(d, s))
            if devs not in node_of:
                raise ValueError(f"fused training: critic_train ({critic}) stage {s} of dp "
                                 f"replica {d} is on devices {sorted(devs)}, which are not "
                                 f"one stage of actor_train ({actor})")
            perm.append(node_of[devs])
        if result is not None and tuple(perm) != result:
            raise ValueError(f"fused training: critic_train ({critic}) maps its stages onto "
                             f"actor_train ({actor}) differently in different dp replicas")
        result = tuple(perm)
    return result


def build_problem(smap: Sequence[int], microbatches: Sequence[int],
                  profile: dict[str, list[tuple[float, float, float]]]) -> dict:
    """The schedule problem of one fused step: ``microbatches[p]`` per pipeline (one dp
    replica's count) and ``profile[name][stage] = (fwd_s, bwd_s, mem_bytes)``.

    Times are scaled to milliseconds and memory to MiB (the scheduler is unit-free;
    this keeps its numbers readable). A stage with no saved activations still counts
    a tiny amount, so that the memory objective sees every outstanding micro-batch.
    """
    pp = len(smap)
    stage_nodes = (list(range(pp)), list(smap))
    pipes = []
    for p, name in enumerate(PIPELINES):
        prof = profile[name]
        pipes.append({
            "name": name, "stage_nodes": stage_nodes[p], "microbatches": int(microbatches[p]),
            "fwd": [max(1e-3, 1e3 * f) for f, _, _ in prof],
            "bwd": [max(1e-3, 1e3 * b) for _, b, _ in prof],
            "mem": [max(1e-3, m / MEM_UNIT) for _, _, m in prof]})
    return {"nodes": pp, "pipelines": pipes}


def memory_cap(problem: dict, free_bytes: Sequence[float] | None) -> float | None:
    """The per-node peak-memory cap of ``problem`` (in its units) from ``free_bytes[node]``,
    the activation memory each node's device has free; ``None`` when not measured
    (the solver's default: 1F1B side by side).

    The solver takes one cap for all nodes: the smallest node's. A node that cannot
    hold even one micro-batch of its stages of one pipeline (the schedule's floor) is a
    ``ValueError`` that says how many micro-batches fit there (RLHFuse §5: the fused
    schedule must fit the device memory left after the models' states).
    """
    from fusedrl.runtime.memory import max_inflight_microbatches

    if free_bytes is None:
        return None
    if len(free_bytes) != problem["nodes"]:
        raise ValueError(f"memory_cap: {len(free_bytes)} free-memory values for "
                         f"{problem['nodes']} nodes")
    # The floor of any schedule: some node holds all of one micro-batch's stages there
    # (its backward starts only after its last forward), per pipeline.
    need = [0.0] * problem["nodes"]
    for pipe in problem["pipelines"]:
        held = [0.0] * problem["nodes"]
        mems = pipe["mem"]
        if isinstance(mems, (int, float)):  # one number for every stage
            mems = [mems] * len(pipe["stage_nodes"])
        for node, mem in zip(pipe["stage_nodes"], mems):
            held[node] += mem * MEM_UNIT
        need = [max(a, b) for a, b in zip(need, held)]
    for node, (free, one) in enumerate(zip(free_bytes, need)):
        if max_inflight_microbatches(free, one) < 1:
            raise ValueError(f"memory_cap: node {node} has {free / MEM_UNIT:.1f} MiB free for "
                             f"activations, less than one micro-batch of its stages "
                             f"({one / MEM_UNIT:.1f} MiB); use smaller micro-batches")
    return min(free_bytes) / MEM_UNIT


def solver_memory_cap(problem: dict, free_bytes: Sequence[float] | None) -> float | None:
    """The ``memory_cap`` to give the solver: :func:`memory_cap` of the measured free
    bytes, or ``None`` (no cap) where nothing was measured or where even a schedule
    that forwards every micro-batch before any backward fits. The solver's own
    objective is lexicographic (makespan, then peak memory at that makespan, RLHFuse
    §5), so a measured cap is the device's real limit and is always passed on when it
    could bind; a node that cannot hold one micro-batch is :func:`memory_cap`'s
    ``ValueError``."""
    cap = memory_cap(problem, free_bytes)
    if cap is None:
        return None
    # The most any schedule can hold on a node: all micro-batches of all its stages.
    most = [0.0] * problem["nodes"]
    for pipe in problem["pipelines"]:
        mems = pipe["mem"]
        if isinstance(mems, (int, float)):
            mems = [mems] * len(pipe["stage_nodes"])
        for node, mem in zip(pipe["stage_nodes"], mems):
            most[node] += mem * pipe["microbatches"]
    return cap if cap < max(most) else None


def node_tasks(result: dict, nodes: int) -> list[list[Task]]:
    """Per node, its tasks in execution order, from a result's ``tasks`` records."""
    index = {name: p for p, name in enumerate(PIPELINES)}
    out: list[list[Task]] = [[] for _ in range(nodes)]
    for rec in sorted(result["tasks"], key=lambda r: (r["node"], r["start"])):
        out[rec["node"]].append(Task(index[rec["pipeline"]], rec["microbatch"], rec["stage"],
                                     rec["kind"]))
    return out


def check_node_tasks(tasks: Sequence[Task], node: int, smap: Sequence[int],
                     microbatches: Sequence[int]) -> None:
    """``tasks`` must be exactly the F and B of every micro-batch of every stage the node
    holds, each forward before its backward (``ValueError`` otherwise): an executor
    given anything else would wait for a message that never comes."""
    stage_nodes = (list(range(len(smap))), list(smap))
    want = sorted(Task(p, i, s, k) for p in range(len(PIPELINES))
                  for s, n in enumerate(stage_nodes[p]) if n == node
                  for i in range(microbatches[p]) for k in "FB")
    if sorted(tasks) != want:
        raise ValueError(f"node {node}: the schedule's tasks are not this node's "
                         f"{len(want)} forward and backward tasks")
    seen = set()
    for t in tasks:
        if t.kind == "B" and (t.pipeline, t.microbatch, t.stage) not in seen:
            raise ValueError(f"node {node}: backward {t} before its forward")
        seen.add((t.pipeline, t.microbatch, t.stage))


def sequential_tasks(smap: Sequence[int], microbatches: Sequence[int]) -> list[list[Task]]:
    """Per node: the actor's 1F1B then the critic's 1F1B (the unfused order, as
    :func:`fusedrl.pipeline.schedule.train_1f1b` runs it), in the executor's format."""
    pp = len(smap)
    stage_nodes = (list(range(pp)), list(smap))
    out: list[list[Task]] = [[] for _ in range(pp)]
    for p in range(len(PIPELINES)):
        m = microbatches[p]
        for s in range(pp):
            warm = min(pp - s - 1, m)
            seq = [("F", i) for i in range(warm)]
            for i in range(warm, m):
                seq += [("F", i), ("B", i - warm)]
            seq += [("B", i) for i in range(m - warm, m)]
            out[stage_nodes[p][s]].extend(Task(p, i, s, k) for k, i in seq)
    return out


def shared_core_makespan(tasks: Sequence[Sequence[Task]], smap: Sequence[int],
                         profile: dict[str, list[tuple[float, float, float]]],
                         slowdown: float = 1.0) -> float:
    """Makespan (profile units) of per-node task lists run as the executor runs them
    (each node in its order; a task starts once its input's task ended), where a task
    progresses ``1 / slowdown`` as fast while another node computes too.

    ``slowdown`` is what two devices that share one physical resource cost each other
    (two vCPUs on one SMT core, measured by bench/fused_train.py); 1 gives the
    scheduler's own timing model (independent devices, RLHFuse §5). With more than two
    nodes the rate is ``1 / (1 + (slowdown - 1) * busy_others / (nodes - 1))``.
    ``profile[name][stage] = (fwd, bwd, mem)`` as :func:`build_problem` takes it."""
    if slowdown < 1:
        raise ValueError(f"slowdown must be >= 1, got {slowdown}")
    pp = len(smap)
    nodes = len(tasks)
    stage_nodes = (list(range(pp)), list(smap))
    done: set[tuple] = set()
    pos = [0] * nodes
    left: list[float | None] = [None] * nodes  # remaining solo time of the running task
    now = 0.0

    def ready(t: Task) -> bool:
        if t.kind == "F":
            return t.stage == 0 or (t.pipeline, t.microbatch, t.stage - 1, "F") in done
        return t.stage == pp - 1 or (t.pipeline, t.microbatch, t.stage + 1, "B") in done

    while True:
        for n in range(nodes):  # start every task whose input has arrived
            if left[n] is None and pos[n] < len(tasks[n]) and ready(tasks[n][pos[n]]):
                t = tasks[n][pos[n]]
                if stage_nodes[t.pipeline][t.stage] != n:
                    raise ValueError(f"task {t} is not on node {n}")
                left[n] = profile[PIPELINES[t.pipeline]][t.stage][0 if t.kind == "F" else 1]
        busy = [n for n in range(nodes) if left[n] is not None]
        if not busy:
            if any(pos[n] < len(tasks[n]) for n in range(nodes)):
                raise ValueError("task lists wait for each other (not a valid schedule)")
            return now
        share = (len(busy) - 1) / max(1, nodes - 1)
        rate = 1.0 / (1.0 + (slowdown - 1.0) * share)
        step = min(left[n] for n in busy) / rate
        now += step
        for n in busy:
            left[n] -= step * rate
            if left[n] <= 1e-12:
                done.add(tuple(tasks[n][pos[n]]))
                pos[n] += 1
                left[n] = None
