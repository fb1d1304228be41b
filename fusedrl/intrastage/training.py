"""Fused actor/critic training on shared workers (RLHFuse §5 intra-stage fusion).

With ``fusion.intrastage: true`` the controller does not run the actor's and then the
critic's 1F1B; every worker of the (common) training placement runs both
models' micro-batches in one fused schedule:

1. **Profile** (first training call of the run): each worker times a few forward and
   backward passes of one real micro-batch through its stage of each model
   (:func:`fusedrl.pipeline.fused.profile_stage`, which also counts the activation
   bytes one micro-batch holds) and reports its device's free memory once weights
   exist, less what gradients and optimizer state will still take
   (:meth:`Worker.device_memory`, :func:`fusedrl.runtime.memory.pending_training_bytes`);
   per stage the slowest replica / tp rank counts, per node the least free memory.
2. **Solve** (once per micro-batch counts, cached): the problem of
   :func:`fusedrl.pipeline.fused_plan.build_problem` goes to the scheduler library
   (:func:`fusedrl.scheduler.pipeline_schedule.solve`, a few seconds at most): the
   shortest makespan first, then the lowest peak activation memory at that makespan
   (RLHFuse §5's two phases), under the cap the measured free memory sets
   (:func:`fusedrl.pipeline.fused_plan.solver_memory_cap`).
3. **Execute** per mini-batch: each worker runs its node's task list
   (:func:`fusedrl.pipeline.fused.train_fused`), then reduces, clips and steps each
   model in the shared update loop (:func:`fusedrl.update.run_update`), as the
   sequential path does. The two models
   are independent, so the weights after the step are those of training them one
   after the other (up to float summation order, which FIFO schedules keep).

Data-parallel gradient reduction runs after the fused step (not overlapped with the
last backward): the two models' dp all-reduces share one gloo group when they share
devices, and must be issued in the same order on every replica.
"""

from __future__ import annotations

import math
import time

import ray

from fusedrl.devices import to_device
from fusedrl.pipeline.fused_plan import (PIPELINES, build_problem, check_node_tasks,
                                         node_tasks, solver_memory_cap, stage_map)

SOLVE_SECONDS = 3.0
"""Search time per schedule shape (the search stops earlier at the lower bound)."""
ROLES = ("actor_train", "critic_train")


# ------------------------------------------------------------------ worker side

def worker_profile(worker, batch, idx, repeats: int = 8, statistic: str = "min") -> dict:
    """``{"stages": {name: (dp, stage, fwd_s, bwd_s, mem_bytes)}, "node", "free_bytes"}``
    of this worker: its stages' times and activation bytes per micro-batch, its node
    (actor stage) and the device memory left for activations once both models'
    gradients and optimizer states exist. ``repeats``/``statistic``: those of
    :func:`fusedrl.pipeline.fused.profile_stage`."""
    from fusedrl.pipeline.fused import profile_stage
    from fusedrl.runtime.memory import pending_training_bytes

    from fusedrl.packing import model_input, select

    # the micro-batch as training runs it (packed rows with ppo.packed): the stage
    # costs the fused schedule is solved for are those of the packed micro-batches
    mb = select(to_device(batch, worker.torch_device), to_device(idx, worker.torch_device),
                worker.spec.config.ppo.packed)
    ids = model_input(mb)
    stages = {}
    for name, role in zip(PIPELINES, ROLES):
        shard = worker.shards[role]
        c = shard.groups.coord
        stages[name] = (c.dp, c.pp, *profile_stage(shard.model, shard.groups, ids, repeats, statistic))
    shards = [worker.shards[r] for r in ROLES]
    free, _ = worker.device_memory()  # after profile_stage dropped its graphs and gradients
    pending = sum(pending_training_bytes(s.model, s.optimizer) for s in shards)
    return {"stages": stages, "node": shards[0].groups.coord.pp,
            "free_bytes": max(0, free - pending)}


def fused_forward_backward(worker, shards: dict, work: dict, smap: tuple, plans: dict) -> None:
    """The micro-batches of one mini-batch of both models through this worker's stages
    in the fused schedule's order (:func:`fusedrl.pipeline.fused.train_fused`); each
    task is one event on the device's timeline (``F:actor``, ``B:critic``...).
    ``work[name] = (mine, micro_batches, loss_fn)`` as the shared update loop
    (:meth:`fusedrl.runtime.worker.Worker.train`) prepared them."""
    from fusedrl.packing import model_input
    from fusedrl.pipeline.fused import FusedPipeline, train_fused

    runs, counts = [], []
    for name in PIPELINES:
        shard = shards[name]
        mine, mbs, loss_fn = work[name]
        g = shard.groups
        # dp reduction after the fused step, not overlapped (module docstring)
        runs.append(FusedPipeline(shard.model, g, [model_input(mb) for mb in mbs], loss_fn))
        counts.append(len(mine))
    node = shards[PIPELINES[0]].groups.coord.pp
    tasks = plans[tuple(counts)][node]
    check_node_tasks(tasks, node, smap, counts)
    train_fused(runs, tasks, on_task=lambda t, t0, t1: worker.events.add(
        f"{t.kind}:{PIPELINES[t.pipeline]}", t0, t1))


# -------------------------------------------------------------- controller side

class FusedTraining:
    """The controller's part: profile once, solve per shape (cached), dispatch."""

    def __init__(self, cluster, time_limit: float = SOLVE_SECONDS):
        self.cluster = cluster
        self.actor, self.critic = (cluster.placements[r] for r in ROLES)
        self.smap = stage_map(self.actor, self.critic)
        self.time_limit = time_limit
        self.profile: dict[str, list[tuple[float, float, float]]] | None = None
        self.free_bytes: list[float] | None = None  # per node, for activations
        self.plans: dict[tuple[int, int], list] = {}
        self.results: dict[tuple[int, int], dict] = {}
        self.solve_seconds = 0.0

    def _devices(self) -> list[int]:
        return sorted(self.actor.devices)

    def _profile(self, bref, idx) -> None:
        outs = ray.get([self.cluster.workers[d].profile_fused.remote(bref, idx)
                        for d in self._devices()])
        pp = self.actor.layout.pp
        prof = {name: [(0.0, 0.0, 0.0)] * pp for name in PIPELINES}
        free = [math.inf] * pp
        for out in outs:
            for name, (_, stage, f, b, mem) in out["stages"].items():
                old = prof[name][stage]
                prof[name][stage] = (max(old[0], f), max(old[1], b), max(old[2], mem))
            free[out["node"]] = min(free[out["node"]], out["free_bytes"])
        self.profile = prof
        self.free_bytes = free

    def _solve(self, counts: tuple[int, int]) -> None:
        from fusedrl.scheduler.pipeline_schedule import solve

        t0 = time.perf_counter()
        problem = build_problem(self.smap, counts, self.profile)
        cap = solver_memory_cap(problem, self.free_bytes)
        result = solve(problem, time_limit=self.time_limit, seed=0, memory_cap=cap).to_dict()
        self.solve_seconds += time.perf_counter() - t0
        self.results[counts] = result
        self.plans[counts] = node_tasks(result, len(self.smap))

    def counts(self, micros: list, lengths) -> list[tuple[int, int]]:
        """Micro-batch counts (actor, critic) of each dp replica of one mini-batch (the
        workers' balanced assignment, :func:`fusedrl.update.dp_micro_batches`)."""
        from fusedrl.update import dp_micro_batches

        packed = self.cluster.spec.config.ppo.packed
        return [(len(r), len(r)) for r in dp_micro_batches(micros, lengths,
                                                            self.actor.layout.dp, packed)]

    def train(self, bref, data, schedule: list[list]) -> tuple[dict, dict]:
        """Run one PPO update of both models; ``({name: [per-worker result]}, stats)``
        with the predicted makespans of the fused and the sequential 1F1B schedules."""
        if self.profile is None:
            self._profile(bref, schedule[0][0])
        from fusedrl.update import seq_lengths

        lengths = seq_lengths(ray.get(bref))
        shapes = sorted({c for micros in schedule for c in self.counts(micros, lengths)})
        for c in shapes:
            if c not in self.plans and min(c) > 0:
                self._solve(c)
        plans = {c: self.plans[c] for c in shapes if c in self.plans}
        for c in shapes:
            if min(c) == 0:  # a replica without micro-batches runs no task
                plans[c] = [[] for _ in self.smap]
        outs = ray.get([self.cluster.workers[d].train.remote(
            list(PIPELINES), bref, data, schedule, (self.smap, plans))
            for d in self._devices()])
        fused = sum(self.results[c]["makespan"] for c in shapes if c in self.results)
        seq = sum(self.results[c]["baseline"]["sequential_1f1b"]["makespan"]
                  for c in shapes if c in self.results)
        stats = {"train_schedule/predicted_speedup": seq / fused if fused else math.nan}
        return {name: [o[name] for o in outs] for name in PIPELINES}, stats
