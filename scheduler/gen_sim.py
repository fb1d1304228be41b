"""Discrete-event simulator of one iteration's generation + inference (RLHFuse §4).

``n`` generation instances (dp replicas of the actor's generation placement) pull
samples from one shared queue with continuous batching (at most ``max_batch``
running sequences per instance; a finished sequence's slot is refilled at the next
step). Two modes:

* **unfused**: generation of the whole batch, then every instance loads the
  inference weights (reference, reward, critic) and the batch's inference is
  spread over all of them;
* **fused** (RLHFuse, arXiv 2409.13221 §4): when the samples still generating drop
  below ``Rt``, the migration rule (:func:`~fusedrl.scheduler.migration.plan_migration`
  or a policy's ``plan``) moves them onto ``m`` instances; the freed instances load
  the inference weights and run inference on finished samples while the tail
  generates, every later finished sample streams to inference, and each kept
  instance joins inference when its own tail is done. Without a migration (``Rt``
  never reached, or no instance to free) fused equals unfused: instances switch to
  inference together when generation ends.

Time advances from one *event* of an instance to the next: a sample finishing or a
migrated sample arriving. Between events an instance's batch is fixed, so the
step times form an arithmetic series (each step adds one context token per
sequence) and a run of ``k`` steps has a closed form; a simulation costs
O(samples) events, not O(tokens). Modelled simplifications: a prefill (admission or
re-prefill) delays the instance's next step by its cost and produces no token (an
output of length ``L`` takes ``L`` decode steps); KV transfers into one instance
share its link (serial), sources are not link-limited; inference runs one sample
at a time per instance in finish order (FIFO list scheduling), which has the
throughput of batched inference under a per-token cost model.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from .gen_cost import GenCostModel
from .migration import (KV_TRANSFER, MigrationPlan, SampleState, plan_migration,
                        validate_plan)


class MigrationPlanner(Protocol):
    """What the simulator needs from an inter-stage policy (see ``interstage``)."""

    def threshold(self, batch_size: int) -> int: ...

    def plan(self, remaining_per_instance: Mapping[int, Sequence[SampleState]], *,
             threshold: int, max_sample_tokens: int) -> MigrationPlan | None: ...


@dataclass(frozen=True)
class Interval:
    """Something an instance did: ``kind`` in gen | load | infer | migrate."""

    instance: int
    kind: str
    start: float
    end: float
    sample_id: int | None = None


@dataclass
class GenSimResult:
    """The simulated timeline and its summary (seconds from the iteration start)."""

    fused: bool
    threshold: int
    gen_end_s: float
    infer_start_s: float
    infer_end_s: float
    migration_at_s: float | None
    migration_time_s: float
    num_migrated: int
    plan: MigrationPlan | None
    finish_s: np.ndarray  # per sample: generation finished
    infer_done_s: np.ndarray  # per sample: inference finished
    timeline: list[Interval] = field(repr=False)

    @property
    def makespan_s(self) -> float:
        return max(self.gen_end_s, self.infer_end_s)

    @property
    def overlap_s(self) -> float:
        """Time during which generation and inference ran together."""
        return max(0.0, self.gen_end_s - self.infer_start_s)

    def summary(self) -> dict[str, float | int | bool | None]:
        return {"fused": self.fused, "threshold": self.threshold,
                "gen_end_s": self.gen_end_s, "infer_start_s": self.infer_start_s,
                "infer_end_s": self.infer_end_s, "makespan_s": self.makespan_s,
                "overlap_s": self.overlap_s, "migration_at_s": self.migration_at_s,
                "migration_time_s": self.migration_time_s,
                "num_migrated": self.num_migrated}


def _run_time(u: float, v: float, k: int) -> float:
    """Duration of ``k`` steps whose first takes ``u`` and each next ``v`` more."""
    return k * u + v * k * (k - 1) / 2.0


def _steps_to_reach(u: float, v: float, dt: float) -> int:
    """Smallest ``k >= 0`` with ``_run_time(u, v, k) >= dt``."""
    if dt <= 0:
        return 0
    if v <= 0:
        k = math.ceil(dt / u)
    else:  # v/2 k^2 + (u - v/2) k - dt >= 0
        p = u - v / 2.0
        k = math.ceil((-p + math.sqrt(p * p + 2.0 * v * dt)) / v)
    k = max(k, 0)
    while k > 0 and _run_time(u, v, k - 1) >= dt:  # float fix-ups
        k -= 1
    while _run_time(u, v, k) < dt:
        k += 1
    return k


class _Instance:
    """One generation instance: its running sequences and its current run of steps."""

    def __init__(self, idx: int):
        self.idx = idx
        self.ids = np.zeros(0, dtype=np.int64)
        self.rem = np.zeros(0, dtype=np.int64)  # output tokens still to decode
        self.ctx = np.zeros(0, dtype=np.int64)  # tokens in the KV cache
        self.t = 0.0  # last step boundary
        self.t0 = 0.0  # decoding of the current run starts (after any prefill)
        self.arrivals: list[tuple[float, int, int, bool]] = []  # (time, id, ctx, reprefill)
        self.generating = True
        self.version = 0
        self.scheduled_k = 0
        self.stop_s: float | None = None

    @property
    def batch(self) -> int:
        return len(self.ids)

    def rates(self, cost: GenCostModel) -> tuple[float, float]:
        """(first step time, per-step increase) of the current run."""
        b = self.batch
        return (cost.decode_step_s(b, float(self.ctx.sum())),
                cost.decode_per_ctx_token_s * b)


class _Simulation:
    def __init__(self, out_len: np.ndarray, prompt_len: np.ndarray, cost: GenCostModel,
                 num_instances: int, max_batch: int, threshold: int | None,
                 planner: MigrationPlanner | None, max_sample_tokens: int):
        self.out_len, self.prompt_len, self.cost = out_len, prompt_len, cost
        self.max_batch, self.threshold, self.planner = max_batch, threshold, planner
        self.max_sample_tokens = max_sample_tokens
        self.inst = [_Instance(i) for i in range(num_instances)]
        self.queue = list(range(len(out_len)))[::-1]  # pop() takes the next sample
        self.finish = np.full(len(out_len), np.nan)
        self.remaining = len(out_len)  # queued + running + in flight
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.migration_at: float | None = None
        self.migration_tried = False
        self.plan: MigrationPlan | None = None
        self.resumed: dict[int, float] = {}  # moved sample -> decoding resumes
        self.timeline: list[Interval] = []

    # -- per-instance mechanics ---------------------------------------------------------

    def _admit(self, inst: _Instance, now: float, fresh: list[int] | None = None) -> None:
        """Refill free slots (migrated arrivals first, then ``fresh`` or the shared
        queue); the prefill of what was admitted delays the next step."""
        new_ids, new_ctx, new_rem, prefill_tokens, resumed = [], [], [], 0, []
        free = self.max_batch - inst.batch
        keep = []
        for arr in inst.arrivals:
            t_arr, sid, ctx, reprefill = arr
            if t_arr <= now and free > 0:
                free -= 1
                new_ids.append(sid)
                new_ctx.append(ctx)
                new_rem.append(self.out_len[sid] - (ctx - self.prompt_len[sid]))
                prefill_tokens += ctx if reprefill else 0
                resumed.append(sid)
            else:
                keep.append(arr)
        inst.arrivals = keep
        take = fresh if fresh is not None else []
        while fresh is None and free > 0 and self.queue and inst.generating:
            take.append(self.queue.pop())
            free -= 1
        for sid in take:
            new_ids.append(sid)
            new_ctx.append(int(self.prompt_len[sid]))
            new_rem.append(int(self.out_len[sid]))
            prefill_tokens += int(self.prompt_len[sid])
        if new_ids:
            inst.ids = np.concatenate([inst.ids, np.asarray(new_ids, dtype=np.int64)])
            inst.ctx = np.concatenate([inst.ctx, np.asarray(new_ctx, dtype=np.int64)])
            inst.rem = np.concatenate([inst.rem, np.asarray(new_rem, dtype=np.int64)])
        inst.t0 = max(inst.t0, now) + self.cost.prefill_s(prefill_tokens)
        for sid in resumed:
            self.resumed[sid] = inst.t0

    def _advance(self, inst: _Instance, k: int, now: float) -> None:
        """Run ``k`` steps ending at boundary ``now``; retire finished samples."""
        if k:
            inst.rem = inst.rem - k
            inst.ctx = inst.ctx + k
        inst.t = now
        done = inst.rem <= 0
        if done.any():
            for sid in inst.ids[done]:
                self.finish[sid] = now
            self.remaining -= int(done.sum())
            inst.ids, inst.rem, inst.ctx = inst.ids[~done], inst.rem[~done], inst.ctx[~done]

    def _schedule(self, inst: _Instance) -> None:
        inst.version += 1
        future = [a[0] for a in inst.arrivals if a[0] > inst.t]
        if inst.batch == 0:  # (arrivals already due were admitted by _admit)
            if future:  # idle until the next migrated sample arrives
                when, k = min(future), 0
            else:  # nothing left: this instance's generation is over (for now)
                inst.stop_s = inst.t
                return
        else:
            u, v = inst.rates(self.cost)
            k = int(inst.rem.min())
            when = inst.t0 + _run_time(u, v, k)
            if future and min(future) < when:
                k = min(k, _steps_to_reach(u, v, min(future) - inst.t0))
                when = inst.t0 + _run_time(u, v, k)
        inst.stop_s = None
        inst.scheduled_k = k
        heapq.heappush(self.heap, (when, self.seq, inst.idx, inst.version, k))
        self.seq += 1

    # -- migration ------------------------------------------------------------------------

    def _sync(self, inst: _Instance, now: float) -> None:
        """Bring ``inst`` to its first step boundary at or after ``now``."""
        if inst.batch == 0:
            inst.t = max(inst.t, now)
            return
        if now <= inst.t0:
            k, when = 0, inst.t0
        else:
            u, v = inst.rates(self.cost)
            k = min(_steps_to_reach(u, v, now - inst.t0), inst.scheduled_k)
            when = inst.t0 + _run_time(u, v, k)
        self._advance(inst, k, when)
        inst.t0 = max(inst.t0, when)

    def _migrate(self, now: float) -> None:
        self.migration_tried = True
        for inst in self.inst:
            self._sync(inst, now)
        remaining = {
            inst.idx: [SampleState(int(s), int(self.prompt_len[s]),
                                   int(c - self.prompt_len[s]))
                       for s, c in zip(inst.ids, inst.ctx)]
            for inst in self.inst}
        if self.planner is not None:
            plan = self.planner.plan(remaining, threshold=self.threshold,
                                     max_sample_tokens=self.max_sample_tokens)
        else:
            plan = plan_migration(remaining, threshold=self.threshold, cost=self.cost,
                                  max_sample_tokens=self.max_sample_tokens)
        for inst in self.inst:
            inst.version += 1  # their scheduled events predate the sync
        if plan is None:
            return
        validate_plan(plan, remaining)
        self.plan, self.migration_at = plan, now
        generated = {s.sample_id: s.generated for samples in remaining.values() for s in samples}
        for idx in plan.freed:
            inst = self.inst[idx]
            inst.generating = False
            inst.stop_s = inst.t
            inst.ids = inst.ids[:0]
            inst.rem, inst.ctx = inst.rem[:0], inst.ctx[:0]
        link_free = {idx: 0.0 for idx in plan.kept}
        for mv in sorted(plan.moves, key=lambda mv: (self.inst[mv.src].t, mv.sample_id)):
            depart = self.inst[mv.src].t
            ctx = int(self.prompt_len[mv.sample_id]) + generated[mv.sample_id]
            if mv.method == KV_TRANSFER:
                arrive = max(link_free[mv.dst], depart) + self.cost.kv_transfer_s(ctx)
                link_free[mv.dst] = arrive
                self.timeline.append(Interval(mv.src, "migrate", depart, arrive, mv.sample_id))
            else:
                arrive = depart
            self.inst[mv.dst].arrivals.append((arrive, mv.sample_id, ctx,
                                               mv.method != KV_TRANSFER))

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> None:
        n = len(self.inst)
        # initial dispatch: round-robin, like a dp scatter of the batch
        first: list[list[int]] = [[] for _ in range(n)]
        for j in range(min(len(self.queue), n * self.max_batch)):
            first[j % n].append(self.queue.pop())
        for inst, sids in zip(self.inst, first):
            self._admit(inst, 0.0, fresh=sids)
            self._schedule(inst)
        while self.heap:
            when, _, idx, version, k = heapq.heappop(self.heap)
            inst = self.inst[idx]
            if version != inst.version:
                continue
            self._advance(inst, k, when)
            self._admit(inst, when)
            if (self.threshold is not None and not self.migration_tried
                    and self.remaining < self.threshold):
                self._migrate(when)
                for other in self.inst:
                    if other.generating:
                        self._admit(other, other.t)
                        self._schedule(other)
            else:
                self._schedule(inst)
        if self.remaining:
            raise RuntimeError(f"simulation ended with {self.remaining} samples unfinished")


def _list_schedule(ready: np.ndarray, work: np.ndarray, available: Mapping[int, float],
                   timeline: list[Interval]) -> np.ndarray:
    """FIFO list scheduling: samples in ready order to the earliest free instance."""
    heap = [(t, idx) for idx, t in available.items()]
    heapq.heapify(heap)
    done = np.zeros(len(ready))
    for sid in np.lexsort((np.arange(len(ready)), ready)):
        free, idx = heapq.heappop(heap)
        start = max(free, float(ready[sid]))
        end = start + float(work[sid])
        done[sid] = end
        timeline.append(Interval(idx, "infer", start, end, int(sid)))
        heapq.heappush(heap, (end, idx))
    return done


def simulate(output_lengths: Sequence[int], cost: GenCostModel, *, num_instances: int,
             max_batch: int, prompt_lengths: Sequence[int] | int = 0,
             threshold: int | None = None, policy: MigrationPlanner | None = None,
             max_sample_tokens: int | None = None) -> GenSimResult:
    """Simulate one iteration's generation + inference.

    Unfused when neither ``threshold`` nor ``policy`` is given. Fused otherwise,
    with ``Rt = threshold`` if given, else ``policy.threshold(batch_size)``, and the
    migration planned by ``policy.plan`` (default: the RLHFuse rule with ``cost``).
    ``max_sample_tokens`` is the longest sample's prompt + response bound for the
    ``m`` formula (default: the longest in this batch). Sample ``i`` is
    ``(prompt_lengths[i], output_lengths[i])``; the shared queue serves them in
    index order.
    """
    out_len = np.asarray(output_lengths, dtype=np.int64).reshape(-1)
    if out_len.size == 0:
        raise ValueError("output_lengths is empty")
    if (out_len < 1).any():
        raise ValueError(f"output_lengths must be >= 1, got min {int(out_len.min())}")
    prompt_len = np.broadcast_to(np.asarray(prompt_lengths, dtype=np.int64),
                                 out_len.shape).copy()
    if (prompt_len < 0).any():
        raise ValueError("prompt_lengths must be >= 0")
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    fused = threshold is not None or policy is not None
    if fused and threshold is None:
        threshold = int(policy.threshold(len(out_len)))
    total = prompt_len + out_len
    if max_sample_tokens is None:
        max_sample_tokens = int(total.max())

    sim = _Simulation(out_len, prompt_len, cost, num_instances, max_batch,
                      threshold if fused else None, policy, max_sample_tokens)
    sim.run()
    finish = sim.finish
    gen_end = float(finish.max())
    migrated = sim.plan is not None
    available: dict[int, float] = {}
    for inst in sim.inst:
        stop = inst.stop_s if (migrated and inst.stop_s is not None) else gen_end
        sim.timeline.append(Interval(inst.idx, "gen", 0.0, stop))
        sim.timeline.append(Interval(inst.idx, "load", stop, stop + cost.weight_load_s))
        available[inst.idx] = stop + cost.weight_load_s
    work = np.array([cost.infer_s(int(t)) for t in total])
    infer_done = _list_schedule(finish, work, available, sim.timeline)
    infer_start = min(iv.start for iv in sim.timeline if iv.kind == "infer")
    migration_time = (max(sim.resumed.values()) - sim.migration_at
                      if migrated and sim.resumed else 0.0)
    return GenSimResult(
        fused=fused, threshold=int(threshold) if fused else 0, gen_end_s=gen_end,
        infer_start_s=float(infer_start), infer_end_s=float(infer_done.max()),
        migration_at_s=sim.migration_at, migration_time_s=float(migration_time),
        num_migrated=sim.plan.num_migrated if migrated else 0, plan=sim.plan,
        finish_s=finish, infer_done_s=infer_done, timeline=sim.timeline)
