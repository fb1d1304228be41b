"""Predicted time and memory of an :class:`~fusedrl.scheduler.plan.ExecutionPlan`.

The cost the plan search (:mod:`fusedrl.scheduler.plan_search`) minimises: one PPO
iteration simulated end to end on a device timeline, every call priced by the
roofline (:mod:`.roofline`) and scheduled by the same scheduler code the runtime
uses (the pieces of :mod:`.iteration`, generalised from "one layout on all
devices" to a placement per call, as ReaLHF's estimator does, arXiv 2406.14088 §4):

1. **reallocation** -- trained actor weights to the generation placement, trained
   critic weights to the critic-inference placement, when they differ
   (:func:`realloc_estimate_s`); each occupies the devices of both placements;
2. **generation** -- :func:`fusedrl.scheduler.simulate_generation` with a cost
   model the roofline fits for the generation layout, once its devices are free.
   When the three inference calls share the generation placement, inference runs
   in the same simulation, and inter-stage fusion (RLHFuse arXiv 2409.13221 §4) is
   the tail migration of the plan's ``Rt`` policy;
3. **inference** -- ``ref``, ``reward``, ``critic_infer`` elsewhere: each sample is
   list-scheduled on the call's dp replicas when its devices are free; with
   inter-stage fusion a call on devices disjoint from generation takes every
   sample the moment it finishes (streaming), otherwise when generation ends;
4. **training** -- after all inference: actor and critic on one placement run one
   fused pipeline schedule (intra-stage fusion, RLHFuse §5) or 1F1B one after the
   other; on different placements each runs its 1F1B (side by side when the
   devices are disjoint); per mini-batch the dp gradient all-reduce and Adam step.

Calls sharing a device run one after the other; the iteration time is the end of
the last call.

Memory per device (bytes), usable = ``memory_headroom * hbm``::

    persistent  = actor/critic training states (16-bit params + grads, fp32 Adam
                  sharded over dp) where they train + 16-bit ref/reward weights
    generation  = actor generation replica (when its placement differs from
                  training) + critic-inference replica (alive until it ran) + KV cache
    inference   = the largest inference call's activations + critic replica
    training    = activations the pipeline schedule holds at its peak
    peak        = persistent + max(generation, inference, training)

The KV cache takes what is left on the generation devices, up to the decode slots
(``Workload.max_gen_batch``) a generation instance runs; a plan whose devices
cannot hold one longest sample's KV, or whose peak exceeds the usable memory,
does not fit.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusedrl.layout import ParallelLayout, Placement
from fusedrl.models.config import ModelConfig
from fusedrl.scheduler import get_policy, simulate_generation
from fusedrl.scheduler.plan import (CALLS, INFER_CALLS, MODEL_OF, ExecutionPlan)
from fusedrl.scheduler.plan_search import Score, SearchSpace
from fusedrl.sim.iteration import Workload
from fusedrl.sim.roofline import Efficiency, Hardware, Roofline

HEAD = {"actor": "lm", "ref": "lm", "reward": "value", "critic": "value"}
"""Output head of each model (reference = actor shape, reward = critic shape)."""
GB = 1e9


@dataclass(frozen=True)
class Event:
    """Something a set of devices did: a call, a reallocation, a migration."""

    label: str
    """A call name, ``realloc:<model>`` or ``migrate``."""
    devices: tuple[int, ...]
    start: float
    end: float


@dataclass
class PlanEstimate:
    """The predicted iteration of one plan."""

    plan: ExecutionPlan
    iteration_s: float
    stage_s: dict[str, float]
    """``realloc``, ``gen``, ``inference``, ``train``: when each stage ended minus when
    the previous one did (they sum to ``iteration_s``)."""
    events: list[Event]
    peak_bytes: np.ndarray
    """Predicted peak memory per device."""
    capacity_bytes: float
    memory_error: str
    """Empty when the plan fits; else what does not fit and by how much."""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def overflow_bytes(self) -> float:
        return max(0.0, float(self.peak_bytes.max()) - self.capacity_bytes)

    @property
    def fits(self) -> bool:
        return not self.memory_error

    @property
    def peak_memory_bytes(self) -> float:
        return float(self.peak_bytes.max())

    def score(self) -> Score:
        over = self.overflow_bytes if not self.fits else 0.0
        if not self.fits and over <= 0:  # e.g. no room for one sample's KV: count that
            over = float(self.details.get("kv_shortfall_bytes", 1.0))
        return Score(self.iteration_s, over, self.capacity_bytes)

    def summary(self) -> dict[str, Any]:
        return {"iteration_s": self.iteration_s,
                **{f"timing_s/{k}": v for k, v in self.stage_s.items()},
                "peak_memory_gb": self.peak_memory_bytes / GB,
                "usable_memory_gb": self.capacity_bytes / GB, "fits": self.fits,
                **({"memory_error": self.memory_error} if self.memory_error else {}),
                **self.details}


def _stage_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Layer ranges per stage (``numpy.array_split`` sizes, docs/design.md)."""
    sizes = [len(a) for a in np.array_split(np.arange(num_layers), pp)]
    out, lo = [], 0
    for s in sizes:
        out.append((lo, lo + s))
        lo += s
    return out


def realloc_estimate_s(roof: Roofline, head: str, src: Placement, dst: Placement) -> float:
    """Seconds to reshard ``roof``'s weights from ``src`` to ``dst`` (ReaLHF §3.2).

    Each destination device receives its shard less what it already holds under
    ``src`` (the layers both stages hold times the overlap of the two tp slices) --
    what :func:`fusedrl.realloc.plan_realloc` sends, without listing the pieces;
    senders share the load over the source devices (every dp replica holds every
    piece). A device's transfer uses NVLink when its node holds a whole source
    replica, InfiniBand otherwise; the busiest device sets the time, plus one
    latency per layer."""
    if src == dst:
        return 0.0
    m, d, hw = roof.model, roof.dtype_bytes, roof.hw
    ls, ld = src.layout, dst.layout
    s_ranges, d_ranges = _stage_ranges(m.num_layers, ls.pp), _stage_ranges(m.num_layers, ld.pp)
    emb_full = m.vocab_size * m.hidden_size
    head_full = emb_full if head == "lm" else m.hidden_size
    layer_full = roof.layer_params(1)
    g = hw.gpus_per_node
    src_nodes: dict[int, int] = {}
    for dev in src.devices:
        src_nodes[dev // g] = src_nodes.get(dev // g, 0) + 1
    replica = ls.tp * ls.pp
    recv_time, total = 0.0, 0.0
    for rank, dev in enumerate(dst.devices):
        c = ld.coord(rank)
        lo, hi = d_ranges[c.pp]
        a0, a1 = c.tp / ld.tp, (c.tp + 1) / ld.tp
        need_layers = float(hi - lo)
        has_emb, has_head = c.pp == 0, c.pp == ld.pp - 1
        held_layers = held_emb = held_head = 0.0
        r = src.rank_of(dev)
        if r is not None:
            sc = ls.coord(r)
            slo, shi = s_ranges[sc.pp]
            b0, b1 = sc.tp / ls.tp, (sc.tp + 1) / ls.tp
            frac = max(0.0, min(a1, b1) - max(a0, b0)) / (a1 - a0)
            held_layers = max(0, min(hi, shi) - max(lo, slo)) * frac
            held_emb = frac if (has_emb and sc.pp == 0) else 0.0
            held_head = frac if (has_head and sc.pp == ls.pp - 1) else 0.0
        need = ((need_layers - held_layers) * layer_full / ld.tp
                + (1 - held_emb) * emb_full / ld.tp * has_emb
                + (1 - held_head) * head_full / ld.tp * has_head) * d
        total += need
        local = src_nodes.get(dev // g, 0) >= replica
        bw = (hw.intra_node_bandwidth if local else hw.inter_node_bandwidth) * roof.eff.comm_eff
        recv_time = max(recv_time, need / bw)
    send_time = total / len(src.devices) / (hw.inter_node_bandwidth * roof.eff.comm_eff) \
        if len(set(src.devices) | set(dst.devices)) > g else \
        total / len(src.devices) / (hw.intra_node_bandwidth * roof.eff.comm_eff)
    if total <= 0:
        return 0.0
    return max(recv_time, send_time) + m.num_layers * hw.collective_latency_s


def _instance_devices(p: Placement) -> list[tuple[int, ...]]:
    """Devices of each dp replica (one generation or inference instance)."""
    lt = p.layout
    return [tuple(p.devices[lt.rank(k, t, s)] for s in range(lt.pp) for t in range(lt.tp))
            for k in range(lt.dp)]


class PlanEvaluator:
    """Predicts :class:`PlanEstimate` of plans for ``actor``/``critic`` (reference of
    the actor's shape, reward of the critic's) on ``num_gpus`` devices.

    ``schedule_time_s``: search budget of each fused training schedule (0: the best
    of RLHFuse's greedy starts and 1F1B). Sub-results (generation simulations,
    pipeline schedules, reallocations) are cached, so re-evaluating plans that
    share calls is cheap.
    """

    def __init__(self, actor: ModelConfig, critic: ModelConfig, workload: Workload,
                 num_gpus: int, hardware: Hardware = Hardware(),
                 efficiency: Efficiency = Efficiency(), *, schedule_time_s: float = 0.0,
                 memory_headroom: float = 0.9, recompute: bool = False, seed: int = 0):
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        if not 0 < memory_headroom <= 1:
            raise ValueError(f"memory_headroom must be in (0, 1], got {memory_headroom}")
        self.models = {"actor": actor, "critic": critic, "ref": actor, "reward": critic}
        roofs = {"actor": Roofline(actor, hardware, efficiency, 2, recompute),
                 "critic": Roofline(critic, hardware, efficiency, 2, recompute)}
        self.roof = {**roofs, "ref": roofs["actor"], "reward": roofs["critic"]}
        self.w, self.n, self.hw = workload, num_gpus, hardware
        self.capacity = hardware.hbm_bytes * memory_headroom
        self.schedule_time_s, self.seed = schedule_time_s, seed
        self._gen_cache: dict[tuple, Any] = {}
        self._pipe_cache: dict[tuple, tuple[float, float]] = {}
        self._realloc_cache: dict[tuple, float] = {}

    # -- the search space ------------------------------------------------------------------

    def layout_ok(self, call: str, layout: ParallelLayout) -> bool:
        try:
            layout.check_model(self.models[MODEL_OF[call]])
        except ValueError:
            return False
        return True

    def space(self, **kw) -> SearchSpace:
        return SearchSpace.build(self.n, self.hw.gpus_per_node, self.layout_ok,
                                 self.w.batch_size, self.w.mini_batch_size, **kw)

    def score(self, plan: ExecutionPlan) -> Score:
        """The search's cost: :meth:`evaluate` without recording the timeline."""
        return self.evaluate(plan, timeline=False).score()

    # -- pieces ----------------------------------------------------------------------------------

    def _weights(self, model: str, lt: ParallelLayout) -> float:
        r = self.roof[model]
        return r.params_per_device(lt, HEAD[model]) * r.dtype_bytes

    def _train_mb_size(self, plan: ExecutionPlan, call: str) -> int:
        return plan.micro_batch_size(call, self.w.mini_batch_size)

    def _pipeline(self, calls: tuple[tuple[str, ParallelLayout, int, int], ...], fused: bool
                  ) -> tuple[float, float]:
        """(makespan, peak activation bytes of a node) of one mini-batch's pipeline(s):
        ``(model, layout, micro_batches, micro_batch_size)`` each; two on one layout are
        the actor in stage order and the critic reversed (RLHFuse §5)."""
        key = (calls, fused)
        if key in self._pipe_cache:
            return self._pipe_cache[key]
        from fusedrl.scheduler.pipeline_baselines import one_f_one_b
        from fusedrl.scheduler.pipeline_problem import FusedProblem, TaskTable
        from fusedrl.scheduler.pipeline_schedule import solve, time_schedule

        s = self.w.mean_seq_len
        pipes = []
        for i, (model, lt, M, mbs) in enumerate(calls):
            roof = self.roof[model]
            f, b = roof.train_stage_s(mbs, s, lt, HEAD[model])
            nodes = list(range(lt.pp))
            pipes.append({"name": model, "stage_nodes": nodes if i == 0 else nodes[::-1],
                          "microbatches": M, "fwd": f, "bwd": b,
                          "mem": roof.activation_bytes(mbs, s, lt)})
        problem = {"nodes": calls[0][1].pp, "pipelines": pipes}
        if fused and len(calls) > 1:
            res = solve(problem, time_limit=self.schedule_time_s, seed=self.seed, workers=1)
            out = (res.makespan, res.peak_memory)
        else:  # 1F1B, one pipeline after the other: the schedule without any search
            fp = FusedProblem.from_dict(problem)
            table = TaskTable.build(fp)
            t = time_schedule(table, one_f_one_b(fp, table))
            out = (t.makespan, t.peak_memory)
        self._pipe_cache[key] = out
        return out

    def _train_extra_s(self, model: str, lt: ParallelLayout) -> float:
        r, h = self.roof[model], HEAD[model]
        return r.grad_sync_s(lt, h) + r.optimizer_s(lt, h)

    @property
    def _steps(self) -> int:
        return self.w.ppo_epochs * self.w.batch_size // self.w.mini_batch_size

    def _realloc_s(self, model: str, src: Placement, dst: Placement) -> float:
        key = (model, src, dst)
        if key not in self._realloc_cache:
            self._realloc_cache[key] = realloc_estimate_s(self.roof[model], HEAD[model], src, dst)
        return self._realloc_cache[key]

    def _per_sample_kv(self, lt: ParallelLayout) -> float:
        """KV bytes of one longest sample on one generation instance."""
        return (self.roof["actor"].kv_bytes_per_token(lt.tp) * lt.tp
                * (self.w.max_prompt_len + self.w.max_new_tokens))

    def _infer_chunk(self, plan: ExecutionPlan, call: str) -> int:
        lt = plan.placement(call).layout
        return max(1, -(-self.w.batch_size // (lt.dp * plan[call].micro_batches)))

    def _infer_act_bytes(self, plan: ExecutionPlan, call: str) -> float:
        """One forward chunk's live activations on a device: one layer's
        intermediates (inference keeps no activations across layers) and, for an LM
        head, the fp32 logits of the chunk's tokens."""
        model = MODEL_OF[call]
        roof, lt = self.roof[model], plan.placement(call).layout
        chunk, s = self._infer_chunk(plan, call), self.w.mean_seq_len
        layers = max(len(a) for a in np.array_split(np.arange(roof.model.num_layers), lt.pp))
        per_layer = roof.activation_bytes(chunk, s, lt) / layers
        logits = chunk * s * roof.model.vocab_size / lt.tp * 4 if HEAD[model] == "lm" else 0.0
        return per_layer + logits

    def _gen(self, lg: ParallelLayout, max_batch: int, kv_capacity: float, colocated: bool,
             fused: bool, rt_policy: str):
        key = (lg, max_batch, kv_capacity, colocated, fused, rt_policy)
        if key in self._gen_cache:
            return self._gen_cache[key]
        w, actor = self.w, self.roof["actor"]
        infer = ([(self.roof["actor"], "lm"), (self.roof["critic"], "value"),
                  (self.roof["critic"], "value")] if colocated else [])
        cost = actor.gen_cost_model(lg, max_batch=max_batch, prompt_len=w.max_prompt_len,
                                    max_new_tokens=w.max_new_tokens,
                                    kv_capacity_bytes=kv_capacity, infer=infer, weight_load_s=0.0)
        policy = None
        if fused and colocated:
            policy = get_policy(rt_policy, cost=cost, num_instances=lg.dp, max_batch=max_batch)
            policy.observe(w.previous_output_lengths, w.prompt_lengths)
        sim = simulate_generation(w.output_lengths, cost, num_instances=lg.dp,
                                  max_batch=max_batch, prompt_lengths=w.prompt_lengths,
                                  policy=policy,
                                  max_sample_tokens=w.max_prompt_len + w.max_new_tokens)
        self._gen_cache[key] = sim
        return sim

    # -- the plan ---------------------------------------------------------------------------------

    def evaluate(self, plan: ExecutionPlan, timeline: bool = True) -> PlanEstimate:
        """Simulate one iteration of ``plan`` (see the module doc); ``timeline=False``
        skips recording the events (the search needs only the time and memory)."""
        if plan.num_devices != self.n:
            raise ValueError(f"plan is for {plan.num_devices} devices, the evaluator for {self.n}")
        for c, cp in plan:
            try:
                cp.placement.layout.check_model(self.models[MODEL_OF[c]])
            except ValueError as e:
                raise ValueError(f"plan field calls.{c}.placement: {e}") from None
        n, w = self.n, self.w
        lt_of = {c: plan.placement(c).layout for c in CALLS}
        dev_of = {c: np.array(plan.placement(c).devices) for c in CALLS}

        # ---- memory: persistent parts and phase transients (per device arrays)
        persistent: dict[str, np.ndarray] = {}
        phases: dict[str, dict[str, np.ndarray]] = {"generation": {}, "inference": {},
                                                    "training": {}}

        def put(table: dict[str, np.ndarray], label: str, call: str, nbytes: float) -> None:
            arr = table.setdefault(label, np.zeros(n))
            arr[dev_of[call]] += nbytes

        for call, model in (("actor_train", "actor"), ("critic_train", "critic")):
            put(persistent, f"{model} training state", call,
                self.roof[model].train_state_bytes(lt_of[call], HEAD[model]))
        put(persistent, "ref weights", "ref", self._weights("ref", lt_of["ref"]))
        put(persistent, "reward weights", "reward", self._weights("reward", lt_of["reward"]))
        reallocs = plan.reallocations()
        replica_calls = {r.dst_call for r in reallocs}
        if "actor_gen" in replica_calls:
            put(phases["generation"], "actor generation replica", "actor_gen",
                self._weights("actor", lt_of["actor_gen"]))
        if "critic_infer" in replica_calls:
            for ph in ("generation", "inference"):
                put(phases[ph], "critic inference replica", "critic_infer",
                    self._weights("critic", lt_of["critic_infer"]))
        infer_act = np.zeros(n)
        for c in INFER_CALLS:
            np.maximum.at(infer_act, dev_of[c], self._infer_act_bytes(plan, c))
        phases["inference"]["inference activations"] = infer_act

        # KV cache: what is left on the generation devices, up to the decode slots
        lg = lt_of["actor_gen"]
        gen_devs = dev_of["actor_gen"]
        used = sum(persistent.values()) + sum(phases["generation"].values())
        room = self.capacity - float(used[gen_devs].max())
        per_sample = self._per_sample_kv(lg)
        inst_devices = lg.tp * lg.pp
        kv_slots = int(max(0.0, room) * inst_devices // per_sample)
        max_batch = max(1, min(w.max_gen_batch, kv_slots))
        kv_shortfall = (max(0.0, per_sample / inst_devices - max(room, 0.0)) if kv_slots < 1
                        else 0.0)
        phases["generation"]["KV cache"] = np.zeros(n)
        phases["generation"]["KV cache"][gen_devs] = max_batch * per_sample / inst_devices

        # ---- time: device timeline
        free = np.zeros(n)
        events: list[Event] = []

        def occupy(label: str, devices, start: float, dur: float) -> float:
            devs = [int(d) for d in devices]
            if timeline:
                events.append(Event(label, tuple(devs), start, start + dur))
            free[devs] = np.maximum(free[devs], start + dur)
            return start + dur

        realloc_end = {"actor_gen": 0.0, "critic_infer": 0.0}
        for r in reallocs:
            devs = sorted(set(r.src.devices) | set(r.dst.devices))
            dur = self._realloc_s(r.model, r.src, r.dst)
            realloc_end[r.dst_call] = occupy(f"realloc:{r.model}", devs, float(free[devs].max()),
                                             dur)
        realloc_done = max(realloc_end.values())

        gp = plan.placement("actor_gen")
        colocated = all(plan.placement(c) == gp for c in INFER_CALLS)
        fused_gen = plan.fusion.inter_stage and colocated
        gen_start = float(max(free[gen_devs].max(), realloc_end["actor_gen"],
                              realloc_end["critic_infer"] if colocated else 0.0))
        # a plan short of one sample's KV is still timed (as if it held one), then rejected
        kv_capacity = per_sample * min(max(kv_slots, 1), 8 * w.max_gen_batch)
        sim = self._gen(lg, max_batch, kv_capacity, colocated, fused_gen,
                        plan.fusion.rt_policy)
        inst_devs = _instance_devices(gp)
        for iv in (sim.timeline if timeline else ()):
            if iv.end <= iv.start:  # e.g. inference of zero cost when it runs elsewhere
                continue
            label = {"gen": "actor_gen", "infer": "inference", "migrate": "migrate",
                     "load": "load"}.get(iv.kind, iv.kind)
            events.append(Event(label, inst_devs[iv.instance], gen_start + iv.start,
                                gen_start + iv.end))
        gen_end = gen_start + sim.gen_end_s
        free[gen_devs] = np.maximum(free[gen_devs], gen_start + sim.makespan_s)
        infer_end = gen_start + sim.makespan_s
        if not colocated:
            finish = gen_start + sim.finish_s
            order = np.argsort(finish, kind="stable").tolist()
            tokens = (w.prompt_lengths + w.output_lengths).astype(float).tolist()
            finish_l = finish.tolist()
            gen_set = set(int(d) for d in gen_devs)
            for c in INFER_CALLS:
                p = plan.placement(c)
                model, lt = MODEL_OF[c], p.layout
                chunk = self._infer_chunk(plan, c)
                roof = self.roof[model]
                per_token = (roof.forward_s(chunk, w.mean_seq_len, lt, HEAD[model])
                             / (chunk * w.mean_seq_len))
                stream = plan.fusion.inter_stage and not (set(p.devices) & gen_set)
                ready = finish_l if stream else [gen_end] * len(finish_l)
                avail_floor = realloc_end["critic_infer"] if c == "critic_infer" else 0.0
                instances = _instance_devices(p)
                heap = [(max(float(free[list(devs)].max()), avail_floor), k)
                        for k, devs in enumerate(instances)]
                heapq.heapify(heap)
                spans: dict[int, list[list[float]]] = {k: [] for k in range(len(instances))}
                last = [None] * len(instances)
                for i in order:
                    t_free, k = heapq.heappop(heap)
                    start = t_free if t_free > ready[i] else ready[i]
                    end = start + per_token * tokens[i]
                    if timeline:  # busy spans, back-to-back samples merged
                        sp = spans[k]
                        if sp and start - sp[-1][1] <= 1e-9:
                            sp[-1][1] = end
                        else:
                            sp.append([start, end])
                    last[k] = end
                    heapq.heappush(heap, (end, k))
                for k, devs in enumerate(instances):
                    for s0, s1 in spans[k]:
                        events.append(Event(c, devs, s0, s1))
                    if last[k] is not None:
                        free[list(devs)] = np.maximum(free[list(devs)], last[k])
                        infer_end = max(infer_end, last[k])

        # training: after all inference (advantages need every value and reward)
        train_start_floor = max(infer_end, gen_end)
        ta, tc = plan.placement("actor_train"), plan.placement("critic_train")
        act = np.zeros(n)
        train_end = train_start_floor
        if ta == tc:
            lt = ta.layout
            fused = plan.fusion.intra_stage == "fused"
            spec = tuple((m, lt, plan[c].micro_batches, self._train_mb_size(plan, c))
                         for c, m in (("actor_train", "actor"), ("critic_train", "critic")))
            span, peak = self._pipeline(spec, fused)
            dur = self._steps * (span + self._train_extra_s("actor", lt)
                                 + self._train_extra_s("critic", lt))
            devs = list(ta.devices)
            start = max(train_start_floor, float(free[devs].max()))
            train_end = occupy("train (fused)" if fused else "actor_train+critic_train", devs,
                               start, dur)
            act[devs] = peak
        else:
            for c, m in (("actor_train", "actor"), ("critic_train", "critic")):
                p = plan.placement(c)
                spec = ((m, p.layout, plan[c].micro_batches, self._train_mb_size(plan, c)),)
                span, peak = self._pipeline(spec, False)
                dur = self._steps * (span + self._train_extra_s(m, p.layout))
                devs = list(p.devices)
                start = max(train_start_floor, float(free[devs].max()))
                train_end = max(train_end, occupy(c, devs, start, dur))
                act[devs] = np.maximum(act[devs], peak)
        phases["training"]["training activations"] = act

        # ---- memory verdict
        base = sum(persistent.values())
        phase_tot = {ph: sum(parts.values()) for ph, parts in phases.items()}
        peak = base + np.maximum.reduce(list(phase_tot.values()))
        error = ""
        worst = int(peak.argmax())
        if peak[worst] <= self.capacity and kv_slots < 1:
            error = (f"actor_gen {gp}: one sample's KV cache ({w.max_prompt_len + w.max_new_tokens}"
                     f" tokens) needs {per_sample / inst_devices / GB:.2f} GB per device but only "
                     f"{max(room, 0) / GB:.2f} GB is left on device "
                     f"{int(gen_devs[used[gen_devs].argmax()])} (short by "
                     f"{kv_shortfall / GB:.2f} GB)")
        elif peak[worst] > self.capacity:
            ph = max(phase_tot, key=lambda k: phase_tot[k][worst])
            parts = [(k, v[worst]) for k, v in persistent.items() if v[worst] > 0]
            parts += [(f"{k} [{ph}]", v[worst]) for k, v in phases[ph].items() if v[worst] > 0]
            error = (f"device {worst} needs {peak[worst] / GB:.1f} GB of "
                     f"{self.capacity / GB:.1f} GB usable (over by "
                     f"{(peak[worst] - self.capacity) / GB:.1f} GB): "
                     + " + ".join(f"{k} {v / GB:.1f} GB" for k, v in parts))
        iteration = max(float(free.max()), train_end)
        stage_s = {"realloc": realloc_done, "gen": max(0.0, gen_end - realloc_done),
                   "inference": max(0.0, train_start_floor - gen_end),
                   "train": iteration - train_start_floor}
        details = {"gen_max_batch": max_batch, "gen_instances": lg.dp,
                   "colocated_inference": colocated, "migration_threshold": sim.threshold,
                   "migrated": sim.num_migrated, "inter_stage_effective": fused_gen or (
                       plan.fusion.inter_stage and not colocated),
                   "kv_shortfall_bytes": kv_shortfall}
        return PlanEstimate(plan, float(iteration), stage_s, events, peak, self.capacity, error,
                            details)
