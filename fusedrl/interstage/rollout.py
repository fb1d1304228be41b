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
   micro-batches of at most ``ppo.micro_batch_size`` in finish order, on any device
   that holds the inference models and is not generating (placed apart from
   generation: from the first finished sample on; colocated: once freed).
3. **Migration.** When the samples still generating drop below ``Rt`` (the policy's
   :meth:`~fusedrl.scheduler.interstage.InterStagePolicy.threshold`), the policy's
   :meth:`plan` (RLHFuse's rule, :func:`~fusedrl.scheduler.migration.plan_migration`)
   keeps ``m`` instances -- those holding the most samples -- and frees the rest.
   A freed instance's samples are aborted and resumed on their destination by
   re-prefill of prompt + generated tokens (``Request.resume``): the per-sample random
   stream makes their tokens and log-probs those of an unmigrated run. The runtime
   implements re-prefill only, so the cost model handed to the policy prices KV-cache
   transfer out of reach (``_NO_KV_TRANSFER_S``) and the plans it executes are
   re-prefill plans. A freed device starts inference right after its abort; a kept
   instance whose tail ends joins inference.
4. **Choosing Rt.** Every ``gen_run`` returns its timed pure-decode steps; after each
   iteration :meth:`FusedRollout.calibrate` fits :class:`GenCostModel` to them
   (:meth:`GenCostModel.fit`) and to the measured inference calls, and the policy
   observes the output lengths. The ``rlhfuse`` policy simulates the iteration over
   the observed lengths for ``Rt`` = 5%..95% of the batch with that model and re-tunes
   every few iterations.

Inference models are used where the placements put them: a device serves the calls
whose placement includes it. When a call's replicas are all on generation devices it
starts when one of them is freed; no extra replica is loaded onto freed devices
(weights reach them only through their own placement).

Supported layouts (:func:`interstage_support`): ``actor_gen`` and every inference call
placed ``tp=pp=1`` (each dp replica one device). Results are the unfused ones up to
floating-point reassociation of differently composed batches (tested in
``tests/test_runtime_interstage.py``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, replace

import ray
import torch

from fusedrl.config import ConfigError
from fusedrl.generation.engine import Request
from fusedrl.scheduler.gen_cost import GenCostModel
from fusedrl.scheduler.interstage import get_policy
from fusedrl.scheduler.migration import SampleState, validate_plan

GEN_ROLE = "actor_gen"
INFER_CALLS = (("actor_train", "logp"), ("ref", "logp"), ("critic_infer", "values"))
"""The inference calls of an iteration (``reward``/``score`` is added with a reward
model): the same as the unfused ``DistributedPPOTrainer.infer``."""

_NO_KV_TRANSFER_S = 1e6
"""Modelled cost of a KV-cache transfer: this runtime migrates by re-prefill only."""


def inference_calls(has_reward_model: bool) -> tuple[tuple[str, str], ...]:
    return INFER_CALLS + ((("reward", "score"),) if has_reward_model else ())


def interstage_support(config, placements: dict, has_reward_model: bool) -> str | None:
    """``None`` when inter-stage fusion can drive these placements, else why not."""
    for role in (GEN_ROLE,) + tuple(r for r, _ in inference_calls(has_reward_model)):
        p = placements[role]
        if p.layout.tp != 1 or p.layout.pp != 1:
            return (f"placement of {role} is {p}; step-level generation and per-device "
                    "inference need tp=1 and pp=1")
    return None


def interstage_enabled(config, placements: dict, has_reward_model: bool) -> bool:
    """``generation.interstage`` resolved: unset means on when supported and ``actor_gen``
    has at least 2 instances; ``true`` where unsupported is a :class:`ConfigError`."""
    flag = config.fusion.interstage
    if flag is False:
        return False
    why = interstage_support(config, placements, has_reward_model)
    if flag is None:
        return why is None and placements[GEN_ROLE].layout.dp >= 2
    if why is not None:
        raise ConfigError(f"config key fusion.interstage=true: {why}")
    return True


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


class FusedRollout:
    """Generation + inference of one iteration, fused (module docstring).

    Stands in for the engine of the reference trainer (:meth:`generate`); the
    controller's ``infer``/``score`` then take the results (:meth:`take_infer`,
    :meth:`take_scores`) instead of recomputing them.
    """

    def __init__(self, trainer):
        self.t = trainer
        c = trainer.config
        self.config = c
        self.gen_placement = trainer.placements[GEN_ROLE]
        self.instances = list(self.gen_placement.devices)  # dp rank i -> its one device
        self.calls = inference_calls(trainer.spec.reward_config is not None)
        self.role_devices = {role: set(trainer.placements[role].devices) for role, _ in self.calls}
        self.steps_per_call = c.fusion.interstage_steps
        self.max_batch = c.generation.max_batch_size
        from fusedrl.models.build import TORCH_DTYPES
        from fusedrl.runtime import memory

        mc = trainer.spec.model_config
        dtype_bytes = TORCH_DTYPES[c.model.dtype].itemsize
        max_len = c.data.max_prompt_len + c.generation.max_new_tokens
        # C of the migration rule (RLHFuse §4): the KV bytes an instance can hold, from the
        # least free memory among the generation devices, measured now that every replica's
        # weights are resident (weight_bytes=0: inference replicas are placed, not loaded);
        # at most the slot cache the engine preallocates (max_batch x max_len).
        free = min(f for f, _ in ray.get([trainer.workers[d].device_memory.remote()
                                          for d in self.instances]))
        kv_per_token = memory.kv_bytes_per_token(mc, dtype_bytes)
        capacity = memory.kv_capacity_bytes(mc, free, dtype_bytes=dtype_bytes, weight_bytes=0,
                                            max_slots=self.max_batch, max_len=max_len)
        # Until the first calibration: that capacity, re-prefill only.
        self.cost = GenCostModel(kv_bytes_per_token=float(kv_per_token),
                                 kv_capacity_bytes=float(capacity),
                                 transfer_latency_s=_NO_KV_TRANSFER_S, weight_load_s=0.0,
                                 bs_max=self.max_batch)
        self.policy = get_policy(c.fusion.interstage_policy, cost=self.cost,
                                 num_instances=len(self.instances), max_batch=self.max_batch)
        self.decode_points: deque = deque(maxlen=4096)
        self.prefill_points: deque = deque(maxlen=512)
        self.infer_points: deque = deque(maxlen=512)  # (tokens, seconds per full call set)
        self.overheads: deque = deque(maxlen=512)  # round trip minus worker busy time
        self._stash: RolloutResult | None = None
        self.last: RolloutResult | None = None

    # ------------------------------------------------------------ trainer hooks

    def generate(self, requests, params) -> list:
        """The engine interface: generate (and infer) ``requests``; samples in order."""
        result = self.run(requests, params)
        self.observe(result)
        self._stash = result
        return result.samples

    def update_weights(self) -> None:
        """Nothing here: the workers' backends load new weights in the trainer's
        ``sync_weights``, after the reallocation."""

    def holds(self, batch) -> bool:
        """Whether the inference results of ``batch`` were computed during generation."""
        s = self._stash
        return s is not None and [x.sample_id for x in s.samples] == batch.sample_ids.tolist()

    def take_scores(self, batch) -> torch.Tensor:
        """Reward-model scores of ``batch`` (rows in batch order)."""
        out = torch.zeros(len(batch))
        for row, value in self._rows(batch, ("reward", "score")):
            out[row] = value
        return out

    def take_infer(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(old_logp, ref_logp, values)`` of ``batch`` padded to its response width, as
        the unfused ``infer`` returns them; the results are used up."""
        width = batch.response_mask.shape[1]
        outs = []
        for call in INFER_CALLS:
            full = torch.zeros(len(batch), width)
            for row, value in self._rows(batch, call):
                full[row, :value.shape[0]] = value
            outs.append(full)
        self._stash = None
        return tuple(outs)

    def _rows(self, batch, call):
        row_of = {sid: r for r, sid in enumerate(batch.sample_ids.tolist())}
        for mb in self._stash.micros:
            for i, s in enumerate(mb.samples):
                yield row_of[s.sample_id], mb.results[call][i]

    def metrics(self) -> dict:
        return dict(self.last.metrics) if self.last is not None else {}

    # ------------------------------------------------------------ the fused loop

    def run(self, requests, params, threshold: int | None = None) -> RolloutResult:
        """Generate ``requests`` and run their inference, fused. ``threshold``: ``Rt``
        (default: the policy's)."""
        workers = self.t.workers
        n = len(self.instances)
        batch = len(requests)
        rt = self.policy.threshold(batch) if threshold is None else threshold
        max_sample_tokens = max(len(r.prompt_ids) + (r.max_new_tokens or params.max_new_tokens)
                                for r in requests)
        micro_size = self.config.ppo.micro_batch_size
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

        def has_gen_work(i: int) -> bool:
            return bool(holding[i] or inbox[i] or (pending and i not in freed))

        def submit(dev: int, fut, what: tuple) -> None:
            inflight[fut] = what + (time.perf_counter(),)
            calls_on[dev] = calls_on.get(dev, 0) + 1

        def dispatch_generation() -> None:
            active = [i for i in range(n) if i not in freed]
            for i in active:
                dev = self.instances[i]
                if not has_gen_work(i) or gen_calls[i] >= 2 or calls_on.get(dev, 0) > \
                        gen_calls[i]:
                    continue
                # fair share of the shared queue, within the engine's free slots
                free = max(0, self.max_batch - len(holding[i]) - len(inbox[i]))
                share = min(free, math.ceil(len(pending) / len(active)))
                if gen_calls[i] and (share or inbox[i]):
                    continue  # new samples go with a call whose reply reports them
                # One more call queued behind the running one keeps the engine stepping
                # through the controller's round trip (it carries no new samples, so
                # the running call's reply still reports everything the engine holds).
                new = [pending.popleft() for _ in range(share)]
                sent = inbox[i] + new
                inbox[i] = []
                holding[i] += [SampleState(r.sample_id, len(r.prompt_ids), len(r.response_ids))
                               for r in sent]
                submit(dev, workers[dev].gen_run.remote(GEN_ROLE, sent, self.steps_per_call),
                       ("gen", i, dev, gen_calls[i] > 0))
                gen_calls[i] += 1

        def generating_devices() -> set[int]:
            return {self.instances[i] for i in range(n) if i not in freed and has_gen_work(i)}

        def dispatch_inference() -> None:
            busy = generating_devices()
            for dev in sorted({d for ds in self.role_devices.values() for d in ds}):
                # two calls per device: the next micro-batch waits on the worker, not
                # on the controller's round trip
                if calls_on.get(dev, 0) >= 2 or dev in busy:
                    continue
                held = {c for c in self.calls if dev in self.role_devices[c[0]]}
                if not held:
                    continue
                mb = next((m for m in micros if m.todo & held), None)
                if mb is None and unbatched:
                    mb = _Micro([unbatched.popleft()
                                 for _ in range(min(micro_size, len(unbatched)))],
                                set(self.calls))
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
                    submit(dev, workers[dev].gen_abort.remote(GEN_ROLE), ("abort", src, dev))

        def least_loaded_kept() -> int:
            kept = [i for i in range(n) if i not in freed]
            return min(kept, key=lambda i: (len(holding[i]) + len(inbox[i]), i))

        dispatch_generation()
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
                        finished[s.sample_id] = s
                        unbatched.append(s)
                    if i not in freed:  # a freed instance's state comes with its abort
                        holding[i] = [SampleState(*st) for st in out["running"]]
                    self.decode_points.extend(out["decode"])
                    self.prefill_points.extend(out["prefill"])
                    if not what[3]:  # a queued call's round trip includes its wait
                        self.overheads.append((now - t_sub - out["busy_s"],
                                               self.steps_per_call))
                    if len(finished) == batch:
                        gen_end = now - t0
                elif kind == "abort":
                    src = what[1]
                    holding[src] = []
                    dst_of = plan.destination()
                    for s in out:
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
            maybe_migrate()
            dispatch_generation()
            dispatch_inference()
            dispatch_inference()  # the second call per idle device
        wall = time.perf_counter() - t0

        if len(finished) != batch or unbatched or any(len(m.results) != len(self.calls)
                                                      for m in micros):
            raise RuntimeError(f"fused rollout ended with {len(finished)}/{batch} samples "
                               "generated or inference left undone")
        infer_start = min(s for s, _ in infer_spans)
        infer_end = max(e for _, e in infer_spans)
        metrics = {
            "timing_s/gen": gen_end,
            "timing_s/inference": infer_end - infer_start,
            "timing_s/gen_inference_overlap": max(0.0, min(gen_end, infer_end) - infer_start),
            "timing_s/rollout": wall,
            "interstage/rt": rt,
            "interstage/migrate_at_s": migrate_at if plan is not None else -1.0,
            "interstage/migrated": migrated,
            "interstage/kept_instances": len(plan.kept) if plan is not None else n,
        }
        self.last = RolloutResult([finished[r.sample_id] for r in requests], micros, metrics)
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
                      kv_capacity_bytes=self.cost.kv_capacity_bytes,
                      transfer_latency_s=_NO_KV_TRANSFER_S, weight_load_s=0.0)
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
