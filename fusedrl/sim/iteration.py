"""One PPO iteration at cluster scale, unfused and with each fusion (RLHFuse, ReaLHF).

The iteration's four stages are priced by the roofline (:mod:`.roofline`) and
scheduled by the same scheduler code the runtime uses:

* **generation + inference** -- :func:`fusedrl.scheduler.simulate_generation`
  over the workload's output lengths (continuous batching on every generation
  instance, then reference/reward/critic forwards), with a :class:`GenCostModel`
  the roofline fits for the generation layout; inter-stage fusion (RLHFuse §4)
  is the ``rlhfuse`` policy, tuned on the previous iteration's lengths;
* **training** -- actor and critic pipelines per dp replica as a fused schedule
  problem (:func:`fusedrl.scheduler.pipeline_schedule.solve`): the baseline runs
  the two 1F1B schedules one after the other (``sequential_1f1b``), intra-stage
  fusion (RLHFuse §5) runs the searched fused schedule; per mini-batch the dp
  gradient all-reduce and the Adam step follow;
* **reallocation** -- :func:`fusedrl.realloc.plan_realloc` bytes of the actor and
  the critic from their training layout to the generation layout, over the
  links they cross (ReaLHF).

Variants (:data:`VARIANTS`): ``baseline`` is DeepSpeed-Chat's *flattening* (all
four models on all devices, one layout for every call -- the one that makes this
iteration fastest -- and the stages one after the other); ``realloc`` gives each
call its own layout; ``inter-stage`` and ``intra-stage`` switch on one fusion on
the flattened placement; ``all`` combines the three.

What the simulated system runs (:mod:`.systems`): its kernels, padding
(:data:`PADDING`), recomputation, the forwards after generation
(:data:`INFER_MODELS`). Unfused variants also report ``stages``: predicted seconds
per stage under verl's timer names, which ``fusedrl simulate`` compares with a
published run (issue 18).

Memory, per device (bytes): training states of actor and critic (16-bit params and
grads, fp32 Adam states sharded over dp); flattening also keeps the reference and
reward weights resident, per-call layouts swap them in from host memory (RLHFuse
keeps frozen weights on the host) and hold a 16-bit generation replica of the
actor; what is left (a ``memory_headroom`` share of HBM) is KV cache.
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from fusedrl.layout import ParallelLayout, Placement
from fusedrl.models.config import ModelConfig
from fusedrl.scheduler import get_policy, simulate_generation
from fusedrl.scheduler.length_dist import sample_lengths
from fusedrl.sim.overheads import RuntimeOverheads
from fusedrl.sim.roofline import FUSED_KERNELS, Efficiency, Hardware, KernelProfile, Roofline

STAGES = ("gen", "inference", "train", "realloc")

INFER_MODELS = {"old_log_prob": ("actor", "lm"), "ref": ("actor", "lm"),
                "reward": ("critic", "value"), "values": ("critic", "value")}
"""Inference forwards after generation: which roofline (the reference has the actor's
shape, the reward model the critic's) and which head."""

PADDING = ("micro_batch", "max", "none")
"""How inference and training batches are padded: each micro-batch to its longest
sample (fusedrl's runtime), every sample to ``Workload.pad_to`` (verl without
``use_remove_padding``: prompts left-padded to ``max_prompt_length``, responses to
``max_response_length``), or not at all (packed sequences)."""


@dataclass(frozen=True)
class Variant:
    """Which optimisations an iteration uses."""

    name: str
    per_call_layouts: bool
    """Parameter reallocation: every call on its own layout (else one for all)."""
    inter_stage: bool
    """RLHFuse §4: migrate the generation tail, overlap it with inference."""
    intra_stage: bool
    """RLHFuse §5: one fused actor/critic pipeline schedule."""


VARIANTS = (
    Variant("baseline", False, False, False),
    Variant("realloc", True, False, False),
    Variant("inter-stage", False, True, False),
    Variant("intra-stage", False, False, True),
    Variant("all", True, True, True),
)

# RLHFuse (arXiv 2409.13221 §7) over its own unfused base: a reference, not a target.
RLHFUSE_REPORTED = {"inter_stage_gen_inference": (1.2, 1.6), "intra_stage_train": (1.2, 1.3),
                    "end_to_end": (1.2, 1.4)}


@dataclass(frozen=True)
class Workload:
    """The shape of one PPO iteration."""

    prompt_lengths: np.ndarray
    output_lengths: np.ndarray
    previous_output_lengths: np.ndarray
    """Last iteration's lengths: what the inter-stage policy tunes ``Rt`` on."""
    max_new_tokens: int
    mini_batch_size: int
    micro_batch_size: int
    """Samples per micro-batch on one dp rank."""
    ppo_epochs: int = 1
    max_gen_batch: int = 256
    """Decode slots per generation instance (fewer when the KV cache holds fewer)."""
    padding: str = "micro_batch"
    """One of :data:`PADDING`."""
    pad_to: int = 0
    """Sequence length every sample is padded to with ``padding="max"``."""
    infer_micro_batch_size: int = 0
    """Samples per inference forward on one dp rank (0: ``micro_batch_size``)."""

    def __post_init__(self) -> None:
        if self.padding not in PADDING:
            raise ValueError(f"workload: padding={self.padding!r}; expected one of {PADDING}")
        if self.padding == "max" and self.pad_to < int(
                (self.prompt_lengths + self.output_lengths).max()):
            raise ValueError(f"workload: pad_to={self.pad_to} is shorter than the longest "
                             "sample (prompt + response)")
        if self.infer_micro_batch_size < 0:
            raise ValueError(f"workload: infer_micro_batch_size={self.infer_micro_batch_size} "
                             "must be >= 0")
        n = len(self.output_lengths)
        if n < 1 or len(self.prompt_lengths) != n or len(self.previous_output_lengths) != n:
            raise ValueError("workload: prompt, output and previous lengths must be non-empty "
                             "and of one size")
        if n % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"workload: mini_batch_size={self.mini_batch_size} must divide the "
                             f"batch ({n}) and be a multiple of micro_batch_size="
                             f"{self.micro_batch_size}")
        if min(self.max_new_tokens, self.ppo_epochs, self.max_gen_batch) < 1:
            raise ValueError("workload: max_new_tokens, ppo_epochs, max_gen_batch must be >= 1")

    @property
    def batch_size(self) -> int:
        return len(self.output_lengths)

    @property
    def total_tokens(self) -> int:
        return int(self.prompt_lengths.sum() + self.output_lengths.sum())

    @property
    def mean_seq_len(self) -> float:
        return self.total_tokens / self.batch_size

    def padding_factor(self, micro: int, shuffle_seed: int | None = None) -> float:
        """Padded over real tokens when the batch is cut into micro-batches of ``micro``
        samples -- in sample order (inference), or after a seeded shuffle (PPO's
        mini-batches) -- each padded to its longest sequence, as the runtime does."""
        lens = self.prompt_lengths + self.output_lengths
        if shuffle_seed is not None:
            lens = lens[np.random.default_rng(shuffle_seed).permutation(len(lens))]
        padded = sum(len(c) * int(c.max()) for c in
                     (lens[i:i + micro] for i in range(0, len(lens), micro)))
        return padded / float(lens.sum())

    @property
    def max_prompt_len(self) -> int:
        return int(self.prompt_lengths.max())

    @property
    def infer_micro(self) -> int:
        return self.infer_micro_batch_size or self.micro_batch_size

    def padded_len(self, micro: int, shuffle_seed: int | None = None) -> float:
        """Tokens per sample a matmul processes in micro-batches of ``micro`` samples,
        padding included (see :data:`PADDING`)."""
        if self.padding == "max":
            return float(self.pad_to)
        if self.padding == "none":
            return self.mean_seq_len
        return self.mean_seq_len * self.padding_factor(micro, shuffle_seed)

    @classmethod
    def build(cls, *, batch_size: int, prompt_len: int, max_new_tokens: int,
              mini_batch_size: int, micro_batch_size: int, ppo_epochs: int = 1,
              max_gen_batch: int = 256, lengths: str | None = None, seed: int = 0,
              padding: str = "micro_batch", pad_to: int = 0,
              infer_micro_batch_size: int = 0) -> "Workload":
        """Lengths drawn from ``lengths`` (a :func:`sample_lengths` spec), capped at
        ``max_new_tokens``. Default: long-tailed lognormal with median
        ``max_new_tokens/8`` and 99th percentile ``max_new_tokens`` (its 99.9th
        percentile is ~16x the median, as RLHFuse §2 reports for LMSYS-Chat-1M)."""
        spec = lengths or f"lognormal:{max(1, max_new_tokens // 8)},{max_new_tokens}"
        out = sample_lengths(spec, batch_size, seed=seed, max_len=max_new_tokens)
        prev = sample_lengths(spec, batch_size, seed=seed + 1, max_len=max_new_tokens)
        return cls(np.full(batch_size, prompt_len, dtype=np.int64), out, prev, max_new_tokens,
                   mini_batch_size, micro_batch_size, ppo_epochs, max_gen_batch, padding,
                   pad_to, infer_micro_batch_size)


@dataclass
class VariantResult:
    """One variant's simulated iteration."""

    variant: Variant
    layouts: dict[str, str]
    timing_s: dict[str, float]
    """``gen``, ``inference`` (what runs after generation ends), ``train``, ``realloc``, ``step``."""
    samples_per_s: float
    tokens_per_s: float
    details: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, float] | None = None
    """Unfused variants: predicted seconds per stage under verl's timer names (``gen``,
    ``old_log_prob`` unless generation's timer holds it, ``ref``, ``reward``,
    ``values``, ``update_critic``, ``update_actor``, ``realloc``)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.variant.name, "layouts": self.layouts}
        out.update({f"timing_s/{k}": v for k, v in self.timing_s.items()})
        if self.stages is not None:
            out["stages"] = self.stages
        out.update({"perf/samples_per_s": self.samples_per_s,
                    "perf/throughput": self.tokens_per_s, "details": self.details})
        return out


@dataclass
class SimulationResult:
    """All variants of one configuration, and the speedups they imply."""

    num_gpus: int
    hardware: Hardware
    workload: Workload
    variants: list[VariantResult]

    def by_name(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.variant.name == name:
                return v
        raise KeyError(name)

    def speedups(self) -> dict[str, float]:
        """Ratios of the variants' times (each fusion against the baseline; ``all``
        also against ``realloc``, the unfused system with its own layouts, which is
        what RLHFuse measures its fusions against)."""
        names = {v.variant.name for v in self.variants}
        out: dict[str, float] = {}
        gi = lambda v: v.timing_s["gen"] + v.timing_s["inference"]  # noqa: E731
        if {"baseline", "inter-stage"} <= names:
            out["inter_stage_gen_inference"] = gi(self.by_name("baseline")) / gi(
                self.by_name("inter-stage"))
        if {"baseline", "intra-stage"} <= names:
            out["intra_stage_train"] = (self.by_name("baseline").timing_s["train"]
                                        / self.by_name("intra-stage").timing_s["train"])
        for name in ("realloc", "inter-stage", "intra-stage", "all"):
            if {"baseline", name} <= names:
                out[f"{name}_end_to_end"] = (self.by_name("baseline").timing_s["step"]
                                             / self.by_name(name).timing_s["step"])
        if {"realloc", "all"} <= names:
            base, fused = self.by_name("realloc"), self.by_name("all")
            out["all_over_realloc_gen_inference"] = gi(base) / gi(fused)
            out["all_over_realloc_train"] = base.timing_s["train"] / fused.timing_s["train"]
            out["all_over_realloc_end_to_end"] = base.timing_s["step"] / fused.timing_s["step"]
        return out

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        w = self.workload
        return {
            "cluster": {"gpus": self.num_gpus, "hardware": asdict(self.hardware)},
            "workload": {"batch_size": w.batch_size, "mini_batch_size": w.mini_batch_size,
                         "micro_batch_size": w.micro_batch_size, "ppo_epochs": w.ppo_epochs,
                         "max_new_tokens": w.max_new_tokens,
                         "prompt_len_mean": float(w.prompt_lengths.mean()),
                         "response_length/mean": float(w.output_lengths.mean()),
                         "response_length/median": float(np.median(w.output_lengths)),
                         "response_length/max": int(w.output_lengths.max())},
            "variants": [v.to_dict() for v in self.variants],
            "speedups": self.speedups(),
            "rlhfuse_reported": {k: list(v) for k, v in RLHFUSE_REPORTED.items()},
        }


# ----------------------------------------------------------------------------- layouts


def candidate_layouts(models: Sequence[ModelConfig], num_gpus: int, max_tp: int
                      ) -> list[ParallelLayout]:
    """Every (dp, tp, pp) with ``dp*tp*pp = num_gpus`` that shards all ``models``,
    with tp a power of two within a node (tp all-reduces stay on NVLink)."""
    out = []
    tp = 1
    while tp <= min(max_tp, num_gpus):
        for pp in range(1, num_gpus // tp + 1):
            if num_gpus % (tp * pp):
                continue
            layout = ParallelLayout(num_gpus // (tp * pp), tp, pp)
            try:
                for m in models:
                    layout.check_model(m)
            except ValueError:
                continue
            out.append(layout)
        tp *= 2
    return out


@lru_cache(maxsize=256)
def _realloc_bytes(model: ModelConfig, head: str, src: ParallelLayout, dst: ParallelLayout,
                   num_gpus: int, gpus_per_node: int, dtype_bytes: int
                   ) -> tuple[tuple[float, float, float, float], ...]:
    """Per device: (intra sent, inter sent, intra received, inter received) bytes.

    Plans on a copy of the model with ``lcm(pp_src, pp_dst)`` layers (capped at the
    real count) -- the pieces of one layer repeat in every layer of a stage -- and
    scales the layer parameters' bytes back up; planning all layers of a 65B model
    over 256 devices would take minutes of Python.
    """
    from fusedrl.realloc import plan_realloc

    layers = min(model.num_layers, math.lcm(src.pp, dst.pp))
    small = replace(model, num_layers=layers)
    scale = model.num_layers / layers
    plan = plan_realloc(small, Placement(src, tuple(range(num_gpus))),
                        Placement(dst, tuple(range(num_gpus))), head=head,
                        dtype_bytes=dtype_bytes)
    acc = np.zeros((num_gpus, 4))
    for t in plan.remote_transfers:
        nbytes = t.numel * dtype_bytes * (scale if ".layers." in t.param else 1.0)
        inter = int(t.src // gpus_per_node != t.dst // gpus_per_node)
        acc[t.src, inter] += nbytes
        acc[t.dst, 2 + inter] += nbytes
    return tuple(map(tuple, acc))


def realloc_time_s(roof: Roofline, head: str, src: ParallelLayout, dst: ParallelLayout,
                   num_gpus: int) -> float:
    """Time to reshard ``roof``'s model from ``src`` to ``dst`` (both on all devices):
    the busiest device's send or receive volume over its links (NVLink and IB
    used at once), plus one latency per layer."""
    if src == dst:
        return 0.0
    hw, eff = roof.hw, roof.eff.comm_eff
    per = np.array(_realloc_bytes(roof.model, head, src, dst, num_gpus, hw.gpus_per_node,
                                  roof.dtype_bytes))
    intra, inter = hw.intra_node_bandwidth * eff, hw.inter_node_bandwidth * eff
    send = np.maximum(per[:, 0] / intra, per[:, 1] / inter)
    recv = np.maximum(per[:, 2] / intra, per[:, 3] / inter)
    return float(np.maximum(send, recv).max()) + roof.model.num_layers * hw.collective_latency_s


# ------------------------------------------------------------------------------ simulator


@dataclass
class _GenPlan:
    layout: ParallelLayout
    instances: int
    max_batch: int
    cost: Any  # GenCostModel


class IterationSimulator:
    """Simulates one PPO iteration of ``actor``/``critic`` on ``num_gpus`` devices.

    The reference model has the actor's shape, the reward model the critic's
    (RLHFuse's setting). ``dtype_bytes``: 2 (bf16 on GPUs) or 4 (float32, the CPU
    runs). ``schedule_time_s``: search budget of each fused
    pipeline schedule. ``memory_headroom``: share of HBM usable (the rest is
    fragmentation, workspace, the runtime's own memory). ``overheads``: the
    runtime's time beyond the kernels (:class:`~fusedrl.sim.overheads.RuntimeOverheads`,
    all 0 by default), added to the stage times as its docstring says.

    The system simulated: ``kernels``/``gen_kernels`` the implementation of the
    training/inference passes and of the generation engine; ``recompute`` the actor's
    activation recomputation (``critic_recompute`` the critic's, default the same);
    ``infer_models`` the forwards after generation (names of :data:`INFER_MODELS`);
    ``old_log_prob_in_gen``: the generation stage's timer also holds the actor's
    old-log-prob forward (verl's hybrid engine until early 2025).
    """

    def __init__(self, actor: ModelConfig, critic: ModelConfig, workload: Workload,
                 num_gpus: int, hardware: Hardware = Hardware(),
                 efficiency: Efficiency = Efficiency(), *, schedule_time_s: float = 2.0,
                 memory_headroom: float = 0.9, recompute: bool = False, seed: int = 0,
                 dtype_bytes: int = 2, overheads: RuntimeOverheads = RuntimeOverheads(),
                 kernels: KernelProfile = FUSED_KERNELS,
                 gen_kernels: KernelProfile = FUSED_KERNELS,
                 critic_recompute: bool | None = None,
                 infer_models: Sequence[str] = ("ref", "reward", "values"),
                 old_log_prob_in_gen: bool = False):
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        if not 0 < memory_headroom <= 1:
            raise ValueError(f"memory_headroom must be in (0, 1], got {memory_headroom}")
        unknown = [m for m in infer_models if m not in INFER_MODELS]
        if unknown or len(set(infer_models)) != len(infer_models):
            raise ValueError(f"infer_models {list(infer_models)}: expected distinct names of "
                             f"{sorted(INFER_MODELS)}")
        if old_log_prob_in_gen and "old_log_prob" not in infer_models:
            raise ValueError("old_log_prob_in_gen: 'old_log_prob' is not in infer_models")
        self.infer_models = tuple(infer_models)
        self.old_log_prob_in_gen = old_log_prob_in_gen
        self.ov = overheads
        if overheads.engine_step_s:  # every engine step of the runtime pays it
            efficiency = replace(
                efficiency,
                overhead_prefill_s=efficiency.overhead_prefill_s + overheads.engine_step_s,
                overhead_decode_s=efficiency.overhead_decode_s + overheads.engine_step_s)
        self.actor = Roofline(actor, hardware, efficiency, dtype_bytes, recompute, kernels,
                              gen_kernels)
        self.critic = Roofline(critic, hardware, efficiency, dtype_bytes,
                               recompute if critic_recompute is None else critic_recompute,
                               kernels, gen_kernels)
        self.w, self.n, self.hw = workload, num_gpus, hardware
        self.schedule_time_s, self.seed = schedule_time_s, seed
        self.hbm = hardware.hbm_bytes * memory_headroom
        self.layouts = candidate_layouts([actor, critic], num_gpus, hardware.gpus_per_node)
        if not self.layouts:
            raise ValueError(f"no (dp, tp, pp) layout of {num_gpus} GPUs shards both models")
        self._train_cache: dict[tuple[ParallelLayout, bool], dict[str, Any]] = {}

    # -- memory ----------------------------------------------------------------------------

    def _train_states(self, lt: ParallelLayout) -> float:
        return self.actor.train_state_bytes(lt, "lm") + self.critic.train_state_bytes(lt, "value")

    def _weights(self, roof: Roofline, layout: ParallelLayout, head: str) -> float:
        return roof.params_per_device(layout, head) * roof.dtype_bytes

    def _frozen(self, layout: ParallelLayout) -> float:
        """Reference (actor shape) and reward (critic shape) 16-bit weights per device."""
        return self._weights(self.actor, layout, "lm") + self._weights(self.critic, layout, "value")

    def _microbatches(self, lt: ParallelLayout) -> int:
        per_rank = self.w.mini_batch_size / lt.dp
        if per_rank != int(per_rank) or per_rank % self.w.micro_batch_size:
            return 0
        return int(per_rank) // self.w.micro_batch_size

    def _train_fits(self, lt: ParallelLayout, flatten: bool) -> bool:
        if self._microbatches(lt) < 1:
            return False
        acts = sum(r.activation_bytes(self.w.micro_batch_size, self._train_seq_len, lt) * lt.pp
                   for r in (self.actor, self.critic))
        resident = self._train_states(lt) + (self._frozen(lt) if flatten else 0.0)
        return resident + acts <= self.hbm

    # -- training ----------------------------------------------------------------------------

    @property
    def _train_seq_len(self) -> float:
        """Sequence length a training micro-batch is priced at: the mean, scaled by the
        padding of shuffled micro-batches (each is padded to its longest sample), or
        the padded length (:data:`PADDING`)."""
        return self.w.padded_len(self.w.micro_batch_size, self.seed)

    def _stage_times(self, lt: ParallelLayout):
        mb, s = self.w.micro_batch_size, self._train_seq_len
        out = []
        for roof, head in ((self.actor, "lm"), (self.critic, "value")):
            fw, bw = roof.train_stage_s(mb, s, lt, head, attn_len=self.w.mean_seq_len)
            out.append(([f + self.ov.train_microbatch_s for f in fw], bw))
        return tuple(out)

    def _model_minibatch_extra_s(self, roof: Roofline, head: str, lt: ParallelLayout) -> float:
        return roof.grad_sync_s(lt, head) + roof.optimizer_s(lt, head) + self.ov.optimizer_step_s

    def _per_minibatch_extra_s(self, lt: ParallelLayout) -> float:
        return (self._model_minibatch_extra_s(self.actor, "lm", lt)
                + self._model_minibatch_extra_s(self.critic, "value", lt))

    def train_model_s(self, lt: ParallelLayout) -> dict[str, float]:
        """Predicted ``update_actor`` and ``update_critic`` seconds, each model's 1F1B
        alone (``(M + S - 1)`` times its bottleneck stage's ``f + b`` per mini-batch,
        exact for ``pp = 1``), its gradient sync and optimizer step; the training
        call's fixed cost split evenly."""
        M = self._microbatches(lt)
        out = {}
        for name, (fw, bw), (roof, head) in zip(
                ("update_actor", "update_critic"), self._stage_times(lt),
                ((self.actor, "lm"), (self.critic, "value"))):
            per = (M + lt.pp - 1) * max(f + b for f, b in zip(fw, bw))
            out[name] = (self._steps * (per + self._model_minibatch_extra_s(roof, head, lt))
                         + self.ov.train_call_s / 2)
        return out

    @property
    def _steps(self) -> int:
        return self.w.ppo_epochs * self.w.batch_size // self.w.mini_batch_size

    def train_estimate_s(self, lt: ParallelLayout) -> float:
        """Closed-form 1F1B time (RLHFuse §5: ``(M + S - 1)(f + b)`` per pipeline, the
        bottleneck stage's), for choosing layouts before any schedule is searched."""
        M = self._microbatches(lt)
        per = sum((M + lt.pp - 1) * max(f + b for f, b in zip(fw, bw))
                  for fw, bw in self._stage_times(lt))
        return self._steps * (per + self._per_minibatch_extra_s(lt)) + self.ov.train_call_s

    def train(self, lt: ParallelLayout, fused: bool) -> dict[str, Any]:
        """Training time under ``lt``: 1F1B one model after the other, or the fused
        schedule (same problem, same scheduler code as ``fusedrl schedule``)."""
        key = (lt, fused)
        if key in self._train_cache:
            return self._train_cache[key]
        from fusedrl.scheduler.pipeline_schedule import solve

        M = self._microbatches(lt)
        (af, ab), (cf, cb) = self._stage_times(lt)
        mb, s = self.w.micro_batch_size, self._train_seq_len
        mem_a = self.actor.activation_bytes(mb, s, lt)
        mem_c = self.critic.activation_bytes(mb, s, lt)
        # RLHFuse §5: actor stages in order, critic stages reversed on the same nodes
        # (one node = one pipeline stage's tp x dp devices; dp replicas run alike).
        problem = {"nodes": lt.pp, "pipelines": [
            {"name": "actor", "stage_nodes": list(range(lt.pp)), "microbatches": M,
             "fwd": af, "bwd": ab, "mem": mem_a},
            {"name": "critic", "stage_nodes": list(range(lt.pp))[::-1], "microbatches": M,
             "fwd": cf, "bwd": cb, "mem": mem_c}]}
        res = solve(problem, time_limit=self.schedule_time_s if fused else 0.0, seed=self.seed,
                    workers=1)
        seq = res.sequential_1f1b
        work, nodes = res.problem.total_work, res.problem.nodes
        span = res.makespan if fused else seq.makespan
        out = {"minibatch_pipeline_s": span, "sequential_1f1b_s": seq.makespan,
               "lower_bound_s": res.lower_bound.value, "microbatches": M,
               "bubble_ratio": 1.0 - work / (nodes * span) if span > 0 else 0.0,
               "minibatch_sync_optimizer_s": self._per_minibatch_extra_s(lt),
               "train_s": self._steps * (span + self._per_minibatch_extra_s(lt))
               + self.ov.train_call_s}
        self._train_cache[key] = out
        return out

    # -- generation + inference -----------------------------------------------------------------

    def gen_plan(self, lg: ParallelLayout, lt: ParallelLayout, flatten: bool) -> _GenPlan | None:
        """Cost model and batch of a generation instance under ``lg``, or ``None``
        if the KV cache cannot hold one longest sample."""
        if flatten:
            resident = self._train_states(lt) + self._frozen(lt)
            load_s = 0.0  # every model is already on every device
        else:
            resident = self._train_states(lt) + self._weights(self.actor, lg, "lm")
            infer_w = self._frozen(lg) + self._weights(self.critic, lg, "value")
            if resident + infer_w > self.hbm:
                return None
            # RLHFuse keeps frozen weights in host memory and swaps them in.
            load_s = self._frozen(lg) / self.hw.host_bandwidth
        devices = lg.tp * lg.pp
        kv_capacity = (self.hbm - resident) * devices
        per_sample = (self.actor.kv_bytes_per_token(lg.tp) * lg.tp
                      * (self.w.max_prompt_len + self.w.max_new_tokens))
        max_batch = min(self.w.max_gen_batch, int(kv_capacity // per_sample)) if kv_capacity > 0 else 0
        if max_batch < 1:
            return None
        cost = self.actor.gen_cost_model(
            lg, max_batch=max_batch, prompt_len=self.w.max_prompt_len,
            max_new_tokens=self.w.max_new_tokens, kv_capacity_bytes=kv_capacity,
            weight_load_s=load_s)
        # The scheduler prices inference per real token of a sample: the inference
        # forwards of one instance's share of the batch (micro-batches padded as
        # :data:`PADDING` says) over the real tokens of that share.
        infer = sum(self.infer_model_s(m, lg) for m in self.infer_models)
        per_token = infer * lg.dp / self.w.total_tokens
        cost = dataclasses.replace(cost, infer_per_token_s=per_token)
        return _GenPlan(lg, lg.dp, max_batch, cost)

    def infer_model_s(self, model: str, layout: ParallelLayout) -> float:
        """Predicted seconds of one inference model (:data:`INFER_MODELS`) over the
        batch on one dp rank of ``layout``: its micro-batches, each padded
        (:data:`PADDING`; attention over the real tokens) plus the runtime's
        per-micro-batch overhead."""
        which, head = INFER_MODELS[model]
        roof = self.actor if which == "actor" else self.critic
        mb = self.w.infer_micro
        micro = math.ceil(self.w.batch_size / (mb * layout.dp))
        s = self.w.padded_len(mb)
        frozen = model in ("ref", "reward")
        return micro * (roof.forward_s(mb, s, layout, head, attn_len=self.w.mean_seq_len,
                                       frozen=frozen) + self.ov.infer_microbatch_s)

    def generate(self, plan: _GenPlan, fused: bool):
        """Simulated generation + inference (the ``rlhfuse`` policy when fused)."""
        w = self.w
        policy = None
        if fused:
            policy = get_policy("rlhfuse", cost=plan.cost, num_instances=plan.instances,
                                max_batch=plan.max_batch)
            policy.observe(w.previous_output_lengths, w.prompt_lengths)
        return simulate_generation(w.output_lengths, plan.cost, num_instances=plan.instances,
                                   max_batch=plan.max_batch, prompt_lengths=w.prompt_lengths,
                                   policy=policy,
                                   max_sample_tokens=w.max_prompt_len + w.max_new_tokens)

    def _infer_overhead_s(self, plan: _GenPlan) -> float:
        """``infer_call_s`` (the per-micro-batch overheads are in the per-token cost)."""
        return self.ov.infer_call_s

    # -- layout choices -----------------------------------------------------------------------------

    def flatten_layout(self) -> ParallelLayout:
        """DeepSpeed-Chat flattening: the one layout (all four models resident) that
        makes the unfused iteration fastest."""
        best, best_t = None, math.inf
        for lt in self.layouts:
            if not self._train_fits(lt, flatten=True):
                continue
            plan = self.gen_plan(lt, lt, flatten=True)
            if plan is None:
                continue
            t = self.generate(plan, fused=False).makespan_s + self.train_estimate_s(lt)
            if t < best_t:
                best, best_t = lt, t
        if best is None:
            raise ValueError(f"the models do not fit on {self.n} GPUs with all four resident "
                             "(flattening); use more GPUs")
        return best

    def train_layout(self) -> ParallelLayout:
        """Fastest training layout (closed-form 1F1B estimate) that fits."""
        fits = [lt for lt in self.layouts if self._train_fits(lt, flatten=False)]
        if not fits:
            raise ValueError(f"actor and critic training do not fit on {self.n} GPUs; "
                             "use more GPUs")
        return min(fits, key=self.train_estimate_s)

    def gen_layout(self, lt: ParallelLayout) -> _GenPlan:
        """Fastest generation + inference layout (simulated, unfused) beside ``lt``."""
        best, best_t = None, math.inf
        for lg in self.layouts:
            plan = self.gen_plan(lg, lt, flatten=False)
            if plan is None:
                continue
            t = self.generate(plan, fused=False).makespan_s
            if t < best_t:
                best, best_t = plan, t
        if best is None:
            raise ValueError(f"no generation layout fits beside training on {self.n} GPUs")
        return best

    # -- the iteration ----------------------------------------------------------------------------------

    def run(self, variants: Sequence[Variant] = VARIANTS) -> SimulationResult:
        flat = self.flatten_layout() if any(not v.per_call_layouts for v in variants) else None
        own: tuple[ParallelLayout, _GenPlan] | None = None
        if any(v.per_call_layouts for v in variants):
            lt = self.train_layout()
            own = (lt, self.gen_layout(lt))
        results = []
        for v in variants:
            if v.per_call_layouts:
                lt, plan = own
                realloc = (realloc_time_s(self.actor, "lm", lt, plan.layout, self.n)
                           + realloc_time_s(self.critic, "value", lt, plan.layout, self.n))
            else:
                lt, plan, realloc = flat, self.gen_plan(flat, flat, flatten=True), 0.0
            sim = self.generate(plan, v.inter_stage)
            tr = self.train(lt, v.intra_stage)
            timing = {"gen": sim.gen_end_s + self.ov.gen_call_s,
                      "inference": sim.makespan_s - sim.gen_end_s + self._infer_overhead_s(plan),
                      "train": tr["train_s"], "realloc": realloc}
            timing["step"] = sum(timing[k] for k in STAGES)
            layouts = {"actor_gen": str(plan.layout), "ref": str(plan.layout),
                       "reward": str(plan.layout), "critic_infer": str(plan.layout),
                       "actor_train": str(lt), "critic_train": str(lt)}
            details = {"gen_instances": plan.instances, "gen_max_batch": plan.max_batch,
                       "gen_bs_max": int(plan.cost.bs_max),
                       "migration_threshold": sim.threshold, "migrated": sim.num_migrated,
                       "gen_inference_overlap_s": sim.overlap_s,
                       "weight_load_s": plan.cost.weight_load_s,
                       **{f"train/{k}": val for k, val in tr.items() if k != "train_s"}}
            stages = None
            if not (v.inter_stage or v.intra_stage):
                stages = self.stages(timing, lt, plan.layout)
            results.append(VariantResult(v, layouts, timing, self.w.batch_size / timing["step"],
                                         self.w.total_tokens / timing["step"], details, stages))
        return SimulationResult(self.n, self.hw, self.w, results)

    def stages(self, timing: dict[str, float], lt: ParallelLayout,
               lg: ParallelLayout) -> dict[str, float]:
        """Predicted seconds of an unfused iteration under verl's timer names: each
        inference model alone (see :meth:`infer_model_s`), each model's update (see
        :meth:`train_model_s`); ``gen`` holds ``old_log_prob`` when
        ``old_log_prob_in_gen``."""
        out = {"gen": timing["gen"]}
        for m in self.infer_models:
            t = self.infer_model_s(m, lg)
            if m == "old_log_prob" and self.old_log_prob_in_gen:
                out["gen"] += t
            else:
                out[m] = t
        out.update(self.train_model_s(lt))
        out["realloc"] = timing["realloc"]
        return out
