"""Inter-stage fusion in the Ray runtime: sample-level generation, long-tail migration
and streamed inference (RLHFuse, arXiv 2409.13221 §4).

The unfused iteration generates the whole batch on the ``actor_gen`` replicas, then
runs inference (old and reference log-probs, critic values, reward-model scores) on
the whole batch. Because output lengths are long-tailed, the last few samples keep
every generation instance nearly idle while the inference devices wait.
:class:`FusedRollout` replaces both stages for one iteration:

1. **Sample-level generation.** The ``n`` generation instances (dp replicas of
   ``actor_gen``, one device each) pull from one shared sample queue held by the
   controller; each round trip runs ``generation.interstage_steps`` engine steps on
   an instance (:meth:`InterStageWorker.gen_run`) and brings back the samples that
   finished.
2. **Streaming inference.** Every finished sample goes to inference at once, in
   micro-batches in finish order (``ppo.micro_batch_size`` samples, or within the
   inference token budget ``ppo.infer_micro_batch_tokens``), on any device
   that can serve an inference call and is not generating: a device placed apart
   from generation that holds a one-device replica of the call (from the first
   finished sample on), or a generation device once it is freed or its tail ends.
3. **Migration.** When the samples still generating drop below ``Rt`` (the policy's
   :meth:`~fusedrl.scheduler.interstage.InterStagePolicy.threshold`), the policy's
   :meth:`plan` (RLHFuse's rule, :func:`~fusedrl.scheduler.migration.plan_migration`)
   keeps ``m`` instances -- those holding the most samples -- and frees the rest.
   A freed instance's samples are aborted and resumed on their destination by
   re-prefill of prompt + generated tokens (``Request.resume``) or by sending their
   KV caches over the worker group (:mod:`fusedrl.interstage.kv_migration`), per
   sample whichever the plan's cost model prices lower (``fusion.migration: auto``;
   ``kv``/``reprefill`` force one); the per-sample random stream makes their tokens
   and log-probs those of an unmigrated run either way. The transfer terms of the cost
   model are measured (a probe at start, then every transfer); with
   ``fusion.migration: reprefill`` or a backend without KV export (vLLM) transfer is
   priced out of reach (``_NO_KV_TRANSFER_S``). A freed device starts inference right
   after its abort; a kept instance whose tail ends joins inference.
4. **Choosing Rt.** Every ``gen_run`` returns its timed pure-decode steps; after each
   iteration :meth:`FusedRollout.calibrate` fits :class:`GenCostModel` to them
   (:meth:`GenCostModel.fit`) and to the measured inference calls, and the policy
   observes the output lengths. The ``rlhfuse`` policy simulates the iteration over
   the observed lengths for ``Rt`` = 5%..95% of the batch with that model and re-tunes
   every few iterations.

5. **Freed devices receive the inference models** (RLHFuse §4). Every generation
   device has a one-device copy slot for each inference model (old log-probs,
   reference, critic, reward; :func:`serve_copies`), empty until the device is freed
   or its tail ends. Then the reallocation engine fills it from wherever the model's
   weights live -- the training shards (``actor_train``/``critic_train``, any
   pipeline or tensor layout), the reference's or reward model's own placement --
   moving only what the device lacks (ReaLHF), and inference starts on it at once.
   The old log-probs need no copy where the native engine generates: the device's
   generation copy *is* the current actor. Copies of frozen models stay filled across
   iterations (``placement.keep_inference_copies``); copies of trained models are
   refilled after each update.

Supported layouts (:func:`fusedrl.validate.interstage_support`): ``actor_gen`` placed
``tp=pp=1`` with dp >= 2; inference and training placements are free. Results are the
unfused ones up to floating-point reassociation of differently composed batches
(tested in ``tests/test_runtime_interstage.py`` and ``tests/test_fused_iteration.py``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray
import torch

from fusedrl.generation.engine import Request
from fusedrl.interstage import kv_migration
from fusedrl.partial import GroupTracker, unstarted
from fusedrl.rollout import RolloutBatch
from fusedrl.runtime.stages import inference_calls
from fusedrl.stages import RolloutOutput, StageContext, register_stage
from fusedrl.update import streamed_micro_size
from fusedrl.scheduler.gen_cost import GenCostModel
from fusedrl.scheduler.interstage import get_policy
from fusedrl.scheduler.migration import SampleState, validate_plan

GEN_ROLE = "actor_gen"

_NO_KV_TRANSFER_S = 1e6
"""Modelled cost of a KV-cache transfer where migration is by re-prefill only."""


def serve_copies(config, placements: dict[str, str], roles) -> dict[str, tuple[str, str, int]]:
    """The one-device inference copies of a fused run: ``{"ref@1": (role, source, 1)}``
    for each generation device and inference role that has no one-device replica there
    by its own placement. ``source`` is the copy key the reallocation engine fills it
    from: the role's own copy where it has one, else the training copy it mirrors;
    ``actor_gen`` (the device's generation copy itself, no transfer) for the old
    log-probs where the native engine generates with that copy."""
    from fusedrl.layout import Placement
    from fusedrl.roles import ROLES, Role
    from fusedrl.realloc.weight_sync import sync_pairs

    _, step = sync_pairs(placements, roles)
    has_own_copy = {dst for _, dst in step}
    gen = Placement.parse(placements[GEN_ROLE])
    out = {}
    for dev in gen.devices:
        for role in (r for r, _ in inference_calls(roles)):
            p = Placement.parse(placements[role])
            if p.layout.tp == 1 and p.layout.pp == 1 and dev in p.devices:
                continue  # its own replica on this device serves it
            spec = ROLES[Role(role)]
            if role == "actor_infer" and config.generation.backend == "native":
                src = GEN_ROLE
            elif spec.refresh == "step" and role not in has_own_copy:
                src = str(spec.source)  # placed as its training copy: that copy
            else:
                src = role
            out[f"{role}@{dev}"] = (role, src, dev)
    return out


@dataclass
class _Micro:
    """A micro-batch of finished samples and its inference calls."""

    samples: list
    todo: set  # (role, kind) not yet dispatched
    results: dict = field(default_factory=dict)  # (role, kind) -> tensor


@dataclass
class RolloutResult:
    """One fused iteration: samples (request order) and their inference results."""

    samples: list
    micros: list
    metrics: dict
    carried: list = field(default_factory=list)
    """Partial rollouts: the samples not in the batch (:class:`fusedrl.partial.BatchClose`)."""


class InterStageRollout:
    """Generation + inference of one iteration, fused (module docstring): the
    ``interstage`` rollout stage (:mod:`fusedrl.stages`)."""

    def __init__(self, cluster, config, setup):
        self.cluster = cluster
        c = config
        self.config, self.setup = c, setup
        self.gen_placement = cluster.placements[GEN_ROLE]
        self.instances = list(self.gen_placement.devices)  # dp rank i -> its one device
        self.calls = inference_calls(cluster.spec.roles)
        gen_devices = set(self.instances)
        # A call is served on every generation device (its own replica or a copy the
        # device receives when freed) and on devices apart from generation that hold a
        # one-device replica of it by placement.
        self.role_devices = {}
        for role, _ in self.calls:
            p = cluster.placements[role]
            apart = set(p.devices) - gen_devices if p.layout.tp == p.layout.pp == 1 else set()
            self.role_devices[role] = gen_devices | apart
        self.copies_of = {d: [k for k, (_, _, dev) in cluster.spec.serve.items() if dev == d]
                          for d in self.instances}
        self.steps_per_call = c.fusion.interstage_steps
        self.max_batch = c.generation.max_batch_size
        from fusedrl.models.build import TORCH_DTYPES
        from fusedrl.runtime import memory

        mc = cluster.spec.model_config
        dtype_bytes = TORCH_DTYPES[c.model.dtype].itemsize
        max_len = c.data.max_prompt_len + c.generation.max_new_tokens
        # C of the migration rule (RLHFuse §4): the KV bytes an instance can hold, from the
        # least free memory among the generation devices, measured now that every replica's
        # weights are resident (weight_bytes=0: inference replicas are placed, not loaded);
        # at most the slot cache the engine preallocates (max_batch x max_len).
        free = min(f for f, _ in ray.get([cluster.workers[d].device_memory.remote()
                                          for d in self.instances]))
        kv_per_token = memory.kv_bytes_per_token(mc, dtype_bytes)
        capacity = memory.kv_capacity_bytes(mc, free, dtype_bytes=dtype_bytes, weight_bytes=0,
                                            max_slots=self.max_batch, max_len=max_len)
        # KV migration: the native engine exports caches; the transfer terms come from a
        # probe between the instances now, then from every transfer (calibrate).
        self.migration = c.fusion.migration if c.generation.backend == "native" \
            else "reprefill"
        self.kv_points: deque = deque(maxlen=512)  # measured (bytes, seconds) transfers
        if self.migration != "reprefill":
            self.kv_points.extend(self._probe_transfer(int(kv_per_token)))
        # Until the first calibration: that capacity and the probed transfer.
        self.cost = GenCostModel(kv_bytes_per_token=float(kv_per_token),
                                 kv_capacity_bytes=float(capacity), weight_load_s=0.0,
                                 bs_max=self.max_batch, **self._transfer_terms())
        self.policy = get_policy(c.fusion.interstage_policy, cost=self.cost,
                                 num_instances=len(self.instances), max_batch=self.max_batch)
        self.decode_points: deque = deque(maxlen=4096)
        self.prefill_points: deque = deque(maxlen=512)
        self.infer_points: deque = deque(maxlen=512)  # (tokens, seconds per full call set)
        self.overheads: deque = deque(maxlen=512)  # round trip minus worker busy time
        self.last: RolloutResult | None = None

    def _probe_transfer(self, kv_per_token: int) -> list[tuple[int, float]]:
        """Timed transfers between every pair of generation instances (which also sets
        up NCCL's pair communicators before a source sends unprompted), of the KV of
        16 and 1024 tokens."""
        sizes = [16 * kv_per_token, 1024 * kv_per_token]
        w, points = self.cluster.workers, []
        for a, dev_a in enumerate(self.instances):
            for dev_b in self.instances[a + 1:]:
                _, got = ray.get([w[dev_a].kv_probe.remote(dev_b, sizes, True),
                                  w[dev_b].kv_probe.remote(dev_a, sizes, False)])
                points.extend(got)
        return points

    def _transfer_terms(self) -> dict:
        """``transfer_latency_s``/``transfer_bandwidth`` of the cost model: fitted to the
        measured transfers, or out of reach where migration is by re-prefill."""
        if self.migration == "reprefill" or len({b for b, _ in self.kv_points}) < 2:
            return {"transfer_latency_s": _NO_KV_TRANSFER_S}
        latency, bandwidth = kv_migration.fit_transfer(self.kv_points)
        return {"transfer_latency_s": latency, "transfer_bandwidth": bandwidth}

    # ------------------------------------------------------------ the stage

    def run(self, requests, params, close=None) -> RolloutOutput:
        """Generate ``requests`` and infer them, fused; rows follow ``requests`` (with
        ``close``, partial rollouts: the complete groups in sample-id order)."""
        result = self.run_fused(requests, params, close=close)
        self.observe(result)
        batch = RolloutBatch.from_samples(result.samples, self.setup.tokenizer.pad_token_id)
        width = batch.response_mask.shape[1]
        row_of = {sid: r for r, sid in enumerate(batch.sample_ids.tolist())}
        out = {call: (torch.zeros(len(batch)) if call[1] == "score"
                      else torch.zeros(len(batch), width)) for call in self.calls}
        for mb in result.micros:
            for i, smp in enumerate(mb.samples):
                for call in self.calls:
                    value = mb.results[call][i]
                    if call[1] == "score":
                        out[call][row_of[smp.sample_id]] = value
                    else:
                        out[call][row_of[smp.sample_id], :value.shape[0]] = value
        return RolloutOutput(batch, out["actor_infer", "logp"], out["ref", "logp"],
                             out.get(("critic_infer", "values")), out.get(("reward", "score")),
                             metrics=dict(result.metrics), carried=result.carried)

    def generate(self, requests, params) -> list:
        """Samples without inference (validation): the unfused replicas' generation."""
        from fusedrl.runtime.stages import RayRollout

        return RayRollout(self.cluster, self.config, self.setup).generate(requests, params)

    def close(self) -> None:
        """The workers stop with the cluster."""

    # ------------------------------------------------------------ the fused loop

    def run_fused(self, requests, params, threshold: int | None = None,
                  close=None) -> RolloutResult:
        """Generate ``requests`` and run their inference, fused. ``threshold``: ``Rt``
        (default: the policy's). ``close`` (partial rollouts, :mod:`fusedrl.partial`): a
        group streams to inference when its last sample finishes; once ``close.target``
        groups are complete the shared queue is carried over and every instance aborts
        what it still generates (after its calls in flight return) and turns to
        inference."""
        cluster = self.cluster
        workers = cluster.workers
        n = len(self.instances)
        batch = len(requests)
        rt = self.policy.threshold(batch) if threshold is None else threshold
        max_sample_tokens = max(len(r.prompt_ids) + (r.max_new_tokens or params.max_new_tokens)
                                for r in requests) if requests else 1
        temperature = self.config.generation.temperature
        t0 = time.perf_counter()
        ray.get([workers[d].gen_begin.remote(GEN_ROLE, params) for d in self.instances])

        pending = deque(requests)  # the shared sample queue (RLHFuse §4)
        inbox: dict[int, list] = {i: [] for i in range(n)}  # migrated samples to resume
        holding: dict[int, list[SampleState]] = {i: [] for i in range(n)}
        freed: set[int] = set()
        calls_on: dict[int, int] = {}  # device -> calls in flight
        gen_calls = {i: 0 for i in range(n)}  # gen_run calls in flight per instance
        inflight: dict = {}
        finished: dict[int, object] = {}
        unbatched: deque = deque()  # finished samples not yet in a micro-batch
        micros: list[_Micro] = []
        plan = None
        migrate_at = None
        migrated = 0
        gen_end = None
        infer_spans: list[tuple[float, float]] = []
        serve_bytes = 0
        filled_on: set[int] = set()
        # partial rollouts: groups tracked, the batch closed at its target (fusedrl.partial)
        tracker = GroupTracker(close) if close is not None else None
        closing = False
        carried: list = []  # samples not in the batch
        aborting: set[int] = set()  # instances whose close abort is in flight
        kv = kv_migration.KVRouting(self.migration, self.migration != "reprefill",
                                    self.instances)

        def has_gen_work(i: int) -> bool:
            return bool(holding[i] or inbox[i] or kv.pending(i) or (pending and i not in freed))

        def submit(dev: int, fut, what: tuple) -> None:
            inflight[fut] = what + (time.perf_counter(),)
            calls_on[dev] = calls_on.get(dev, 0) + 1

        def dispatch_generation() -> None:
            active = [] if closing else [i for i in range(n) if i not in freed]
            for i in active:
                dev = self.instances[i]
                if not has_gen_work(i) or gen_calls[i] >= 2 or calls_on.get(dev, 0) > \
                        gen_calls[i]:
                    continue
                # fair share of the shared queue, within the engine's free slots
                free = max(0, self.max_batch - len(holding[i]) - len(inbox[i]))
                share = min(free, math.ceil(len(pending) / len(active)))
                if gen_calls[i] and (share or inbox[i] or kv.pending(i)):
                    continue  # new samples go with a call whose reply reports them
                # One more call queued behind the running one keeps the engine stepping
                # through the controller's round trip (it carries no new samples, so
                # the running call's reply still reports everything the engine holds).
                new = [pending.popleft() for _ in range(share)]
                sent = inbox[i] + new
                inbox[i] = []
                parcels = kv.take(i)  # migrated KV caches, received before the steps
                holding[i] += [SampleState(r.sample_id, len(r.prompt_ids), len(r.response_ids))
                               for r in sent] + kv.states(parcels)
                submit(dev, workers[dev].gen_run.remote(GEN_ROLE, sent, self.steps_per_call,
                                                        parcels),
                       ("gen", i, dev, gen_calls[i] > 0))
                gen_calls[i] += 1

        def generating_devices() -> set[int]:
            return {self.instances[i] for i in range(n) if i not in freed and has_gen_work(i)}

        def fill_copies(dev: int) -> None:
            """The freed device receives its inference models (reallocation engine),
            queued before its first inference call (a worker runs calls in order)."""
            stale = [k for k in self.copies_of.get(dev, ())
                     if k not in cluster.serve_fresh and cluster.spec.serve[k][1] != GEN_ROLE]
            if not stale:
                return
            pairs = [(cluster.spec.serve[k][1], k) for k in stale]
            roles = sorted({r for pair in pairs for r in pair})
            for d, fut in zip(cluster.devices_of(*roles), cluster.sync_futures(pairs)):
                submit(d, fut, ("fill", dev, d))
            cluster.serve_fresh.update(stale)
            filled_on.add(dev)

        def dispatch_inference() -> None:
            busy = generating_devices()
            for dev in sorted({d for ds in self.role_devices.values() for d in ds}):
                # two calls per device: the next micro-batch waits on the worker, not
                # on the controller's round trip
                if calls_on.get(dev, 0) >= 2 or dev in busy:
                    continue
                if not (unbatched or any(m.todo for m in micros)):
                    continue
                fill_copies(dev)
                held = {c for c in self.calls if dev in self.role_devices[c[0]]}
                if not held:
                    continue
                mb = next((m for m in micros if m.todo & held), None)
                if mb is None and unbatched:
                    # in finish order, within the inference token budget (issue 19)
                    take = streamed_micro_size(
                        [len(s.prompt_ids) + len(s.response_ids) for s in unbatched],
                        self.config.ppo)
                    mb = _Micro([unbatched.popleft() for _ in range(take)], set(self.calls))
                    micros.append(mb)
                if mb is None:
                    continue
                jobs = [c for c in self.calls if c in mb.todo & held]
                mb.todo -= set(jobs)
                submit(dev, workers[dev].infer_local.remote(jobs, mb.samples, temperature),
                       ("infer", mb, dev, len(jobs)))

        def maybe_migrate() -> None:
            nonlocal plan, migrate_at
            if migrate_at is not None or rt <= 0 or not finished:
                return
            active = [i for i in range(n) if i not in freed]
            remaining = len(pending) + sum(len(holding[i]) + len(inbox[i]) for i in active)
            if remaining >= rt or remaining == 0:
                return
            migrate_at = time.perf_counter() - t0  # one migration per iteration (§4)
            state = {i: holding[i] + [SampleState(r.sample_id, len(r.prompt_ids),
                                                  len(r.response_ids)) for r in inbox[i]]
                     for i in active}
            plan = self.policy.plan(state, threshold=rt, max_sample_tokens=max_sample_tokens)
            if plan is None:
                return
            validate_plan(plan, state)  # user policies may return anything
            dst_of = plan.destination()
            for src in plan.freed:
                freed.add(src)
                for r in inbox[src]:  # not sent yet: straight to the destination
                    inbox[dst_of[r.sample_id]].append(r)
                inbox[src] = []
                if holding[src]:
                    dev = self.instances[src]
                    # abort; the caches of the samples moving by KV transfer leave at once
                    submit(dev, workers[dev].gen_migrate.remote(
                        GEN_ROLE, kv.kv_to(plan, src, self.instances)), ("abort", src, dev))

        def close_batch() -> None:
            """Partial rollouts, once the batch is complete: no more generation; the
            queue is carried over, and each instance with no call in flight aborts."""
            nonlocal closing, gen_end
            if tracker is None or not tracker.closed:
                return
            if not closing:
                closing = True
                gen_end = time.perf_counter() - t0
                carried.extend(unstarted(r) for r in pending)
                pending.clear()
                for i in range(n):
                    carried.extend(unstarted(r) for r in inbox[i])
                    inbox[i] = []
            for i in range(n):
                if gen_calls[i] == 0 and holding[i] and i not in aborting:
                    aborting.add(i)
                    dev = self.instances[i]
                    submit(dev, workers[dev].gen_abort.remote(GEN_ROLE), ("close", i, dev))

        def least_loaded_kept() -> int:
            kept = [i for i in range(n) if i not in freed]
            return min(kept, key=lambda i: (len(holding[i]) + len(inbox[i]), i))

        if tracker is not None:  # carried finished samples: groups they complete go on
            for s in tracker.start():
                finished[s.sample_id] = s
                unbatched.append(s)
            close_batch()
        dispatch_generation()
        dispatch_inference()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for fut in ready:
                what = inflight.pop(fut)
                kind, dev, t_sub = what[0], what[2], what[-1]
                calls_on[dev] -= 1
                out = ray.get(fut)
                now = time.perf_counter()
                if kind == "gen":
                    i = what[1]
                    gen_calls[i] -= 1
                    for s in out["finished"]:
                        # partial rollouts: a group goes on when complete, and is in the batch
                        for t in (tracker.add(s) if tracker is not None else [s]):
                            finished[t.sample_id] = t
                            unbatched.append(t)
                    if i not in freed:  # a freed instance's state comes with its abort
                        holding[i] = [SampleState(*st) for st in out["running"]]
                    self.decode_points.extend(out["decode"])
                    self.prefill_points.extend(out["prefill"])
                    self.kv_points.extend(out["kv"])
                    kv.observe(out)
                    if not what[3]:  # a queued call's round trip includes its wait
                        self.overheads.append((now - t_sub - out["busy_s"],
                                               self.steps_per_call))
                    if len(finished) == batch:
                        gen_end = now - t0
                elif kind == "fill":
                    serve_bytes += out["bytes_received"]
                elif kind == "close":  # partial rollouts: the aborted samples carry over
                    holding[what[1]] = []
                    aborting.discard(what[1])
                    carried.extend(out)
                elif kind == "abort":
                    src = what[1]
                    holding[src] = []
                    dst_of = plan.destination()
                    migrated += sum(len(p.samples) for p in out["parcels"])
                    for s in kv.route(out):  # the parcels wait for their destination
                        dst = dst_of.get(s.sample_id)
                        if dst is None or dst in freed:
                            dst = least_loaded_kept()
                        inbox[dst].append(Request.resume(s))
                        migrated += 1
                else:
                    mb, n_jobs = what[1], what[3]
                    mb.results.update(out["results"])
                    infer_spans.append((t_sub - t0, now - t0))
                    self.infer_points.append(
                        (out["tokens"], out["busy_s"] * len(self.calls) / n_jobs))
            close_batch()
            maybe_migrate()
            dispatch_generation()
            dispatch_inference()
            dispatch_inference()  # the second call per idle device

        if tracker is not None:  # partial rollouts: the batch is the complete groups
            batch = close.target * close.group_size
        if len(finished) != batch or unbatched or any(len(m.results) != len(self.calls)
                                                      for m in micros):
            raise RuntimeError(f"fused rollout ended with {len(finished)}/{batch} samples "
                               "generated or inference left undone")
        metrics = {
            "interstage/gen_end_s": gen_end,
            "interstage/rt": rt,
            "interstage/serve_bytes": serve_bytes,
            "interstage/devices_received_models": len(filled_on),
            "interstage/migrate_at_s": migrate_at if plan is not None else -1.0,
            "interstage/migrated": migrated,
            "interstage/kept_instances": len(plan.kept) if plan is not None else n,
            **kv.metrics(),
        }
        samples = [finished[r.sample_id] for r in requests] if tracker is None else \
            sorted(finished.values(), key=lambda s: s.sample_id)
        self.last = RolloutResult(samples, micros, metrics,
                                  carried + (tracker.leftover() if tracker is not None else []))
        return self.last

    # ------------------------------------------------------------ choosing Rt

    def observe(self, result: RolloutResult) -> None:
        """Recalibrate the cost model and show the policy this iteration's lengths."""
        self.calibrate()
        self.policy.observe([len(s.response_ids) for s in result.samples],
                            [len(s.prompt_ids) for s in result.samples])

    def calibrate(self) -> GenCostModel:
        """Fit the decode, prefill and inference terms of the policy's cost model to the
        steps and calls measured on the workers (RLHFuse §4: a cost model profiled on
        the real engine). Keeps the previous model while too few points exist."""
        pts = list(self.decode_points)
        if len(pts) < 3 or len({p[0] for p in pts}) < 2:
            return self.cost
        # a round trip costs the controller's dispatch on top of the engine steps
        per_step_overhead = max(0.0, sum(o / k for o, k in self.overheads)
                                / max(1, len(self.overheads)))
        kwargs = dict(kv_bytes_per_token=self.cost.kv_bytes_per_token,
                      kv_capacity_bytes=self.cost.kv_capacity_bytes, weight_load_s=0.0,
                      **self._transfer_terms())
        pre = list(self.prefill_points)
        if len({p[0] for p in pre}) >= 2:
            fitted = GenCostModel.fit(pts, prefill_points=pre, **kwargs)
        else:
            per_token = (sum(s for _, s in pre) / sum(t for t, _ in pre)) if pre else \
                self.cost.prefill_per_token_s
            fitted = GenCostModel.fit(pts, prefill_per_token_s=per_token, prefill_base_s=0.0,
                                      **kwargs)
        if self.infer_points:
            fitted = replace(fitted, infer_per_sample_s=0.0, infer_per_token_s=(
                sum(s for _, s in self.infer_points) / sum(t for t, _ in self.infer_points)))
        fitted = replace(fitted, decode_base_s=fitted.decode_base_s + per_step_overhead,
                         bs_max=min(fitted.bs_max, self.max_batch))
        self.cost = self.policy.cost = fitted
        return fitted


@register_stage("rollout", "interstage")
def _interstage_rollout(ctx: StageContext):
    return InterStageRollout(ctx.cluster, ctx.config, ctx.setup)
