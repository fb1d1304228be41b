"""Execution plan of one PPO iteration: where every model function call runs.

A plan fixes, for each model function call (MFC, ReaLHF arXiv 2406.14088 §3) --
``actor_gen``, ``ref``, ``reward``, ``critic_infer``, ``actor_train``,
``critic_train`` -- its :class:`~fusedrl.layout.Placement` (devices and dp/tp/pp)
and its micro-batch count, plus the fusion settings of RLHFuse (arXiv 2409.13221):
inter-stage fusion on/off with its ``Rt`` policy, intra-stage fused or sequential
training. The weight reallocations the plan implies (actor training -> generation,
critic training -> inference, when their placements differ) are derived, never
stored.

The YAML form (``to_yaml``/``from_yaml``) is what ``fusedrl plan`` prints and
``fusedrl train --plan PLAN.yaml`` reads::

    devices: 16
    calls:
      actor_gen:    {placement: dp8tp2pp1@0-15, micro_batches: 1}
      ref:          {placement: dp4tp2pp1@0-7,  micro_batches: 2}
      reward:       {placement: dp4tp2pp1@8-15, micro_batches: 2}
      critic_infer: {placement: dp4tp2pp1@8-15, micro_batches: 2}
      actor_train:  {placement: dp2tp4pp2@0-15, micro_batches: 8}
      critic_train: {placement: dp2tp4pp2@0-15, micro_batches: 8}
    fusion: {inter_stage: true, rt_policy: rlhfuse, intra_stage: fused}
    # written for reading, ignored when loaded:
    reallocations: ["actor: actor_train dp2tp4pp2@0-15 -> actor_gen dp8tp2pp1@0-15"]
    predicted: {iteration_s: 12.3, peak_memory_gb: 71.2}

``micro_batches`` means: for a training call, micro-batches per mini-batch on one
dp rank (micro-batch size = ``mini_batch_size / (dp * micro_batches)``); for an
inference call, forward chunks the rank's share of the batch is split into;
generation uses continuous batching and takes ``1``.

Pure (no torch): the runtime and the simulator both consume it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import yaml

from fusedrl.layout import Placement
from fusedrl.roles import ROLES, Role

CALLS = tuple(str(r) for r in (Role.ACTOR_GEN, Role.REF, Role.REWARD, Role.CRITIC_INFER,
                                Role.ACTOR_TRAIN, Role.CRITIC_TRAIN))
"""The model function calls a plan places (:mod:`fusedrl.roles`; the plan computes the
old log-probs with ``actor_train``, i.e. ``placement.actor_infer`` left unset)."""
GEN_CALLS = tuple(c for c in CALLS if ROLES[Role(c)].call == "generate")
INFER_CALLS = tuple(c for c in CALLS if ROLES[Role(c)].call in ("logp", "values", "score"))
TRAIN_CALLS = tuple(c for c in CALLS if ROLES[Role(c)].trainable)
MODEL_OF = {c: ROLES[Role(c)].model for c in CALLS}
"""Whose weights each call runs (ref has the actor's shape, reward the critic's)."""
REALLOC_EDGES = tuple((ROLES[Role(d)].model, str(ROLES[Role(d)].source), d) for d in CALLS
                      if ROLES[Role(d)].refresh == "step")
"""(model, source call, destination call): trained weights copied to the call that
uses them next (ReaLHF's realloc hook) when the two placements differ."""
INTRA_MODES = ("fused", "sequential")


class PlanError(ValueError):
    """An invalid plan; the message names the field."""


@dataclass(frozen=True)
class CallPlan:
    """Where one model function call runs and in how many micro-batches."""

    placement: Placement
    """Devices and (dp, tp, pp) layout, Megatron rank order (docs/design.md "Layouts")."""
    micro_batches: int = 1
    """Training: micro-batches per mini-batch per dp rank; inference: forward chunks
    per dp rank; generation: 1 (continuous batching)."""


@dataclass(frozen=True)
class Fusion:
    """RLHFuse's fusion switches (arXiv 2409.13221 §4, §5)."""

    inter_stage: bool = False
    """Inference overlaps generation: streamed per finished sample to inference calls
    on other devices, and the long tail migrated off generation instances that
    inference shares (RLHFuse §4). Off: inference starts when generation ends."""
    rt_policy: str = "rlhfuse"
    """Inter-stage policy choosing the migration threshold ``Rt``
    (``fusedrl.scheduler.available_policies()``)."""
    intra_stage: str = "sequential"
    """``fused``: actor and critic training share one fused pipeline schedule when
    they share a placement (RLHFuse §5); ``sequential``: 1F1B one after the other."""


@dataclass(frozen=True)
class Realloc:
    """One weight reallocation the plan implies (ReaLHF §3.2)."""

    model: str
    src_call: str
    dst_call: str
    src: Placement
    dst: Placement

    def __str__(self) -> str:
        return f"{self.model}: {self.src_call} {self.src} -> {self.dst_call} {self.dst}"


@dataclass(frozen=True)
class ExecutionPlan:
    """Placement and micro-batches of every call, and the fusion settings."""

    num_devices: int
    """Devices of the cluster (ids ``0..num_devices-1``)."""
    calls: tuple[tuple[str, CallPlan], ...]
    """``(call, CallPlan)`` for every name in :data:`CALLS`, in that order; build it
    with :meth:`make` from a mapping."""
    fusion: Fusion = Fusion()
    """Inter- and intra-stage fusion settings."""
    name: str = field(default="", compare=False)
    """Where the plan came from (``flattening``, ``searched``, ...); not part of equality."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_devices, int) or self.num_devices < 1:
            raise PlanError(f"plan field devices: must be an integer >= 1, got {self.num_devices!r}")
        names = [c for c, _ in self.calls]
        if tuple(names) != CALLS:
            missing = [c for c in CALLS if c not in names]
            extra = [c for c in names if c not in CALLS]
            raise PlanError("plan field calls: " + (f"missing {missing}" if missing else "")
                            + (f" unknown {extra}" if extra else "")
                            + ("" if missing or extra else f"must be in the order {CALLS}"))
        for c, cp in self.calls:
            try:
                cp.placement.check_cluster(self.num_devices)
            except ValueError as e:
                raise PlanError(f"plan field calls.{c}.placement: {e}") from None
            if not isinstance(cp.micro_batches, int) or cp.micro_batches < 1:
                raise PlanError(f"plan field calls.{c}.micro_batches: must be an integer >= 1, "
                                f"got {cp.micro_batches!r}")
            if c in GEN_CALLS and cp.micro_batches != 1:
                raise PlanError(f"plan field calls.{c}.micro_batches: generation uses continuous "
                                f"batching; must be 1, got {cp.micro_batches}")
        f = self.fusion
        if not isinstance(f.inter_stage, bool):
            raise PlanError(f"plan field fusion.inter_stage: must be true or false, got "
                            f"{f.inter_stage!r}")
        if f.intra_stage not in INTRA_MODES:
            raise PlanError(f"plan field fusion.intra_stage: must be one of {INTRA_MODES}, got "
                            f"{f.intra_stage!r}")
        from .interstage import available_policies

        if f.rt_policy not in available_policies():
            raise PlanError(f"plan field fusion.rt_policy: unknown policy {f.rt_policy!r}; "
                            f"known: {available_policies()}")

    # -- construction and access ----------------------------------------------------------

    @classmethod
    def make(cls, num_devices: int, calls: Mapping[str, CallPlan | Placement | str],
             fusion: Fusion = Fusion(), name: str = "") -> "ExecutionPlan":
        """Plan from a mapping call -> CallPlan (or a Placement / its text, 1 micro-batch)."""
        unknown = [c for c in calls if c not in CALLS]
        if unknown:
            raise PlanError(f"plan field calls: unknown call(s) {unknown}; known: {CALLS}")
        missing = [c for c in CALLS if c not in calls]
        if missing:
            raise PlanError(f"plan field calls: missing {missing}")
        out = []
        for c in CALLS:
            v = calls[c]
            if isinstance(v, str):
                v = Placement.parse(v)
            if isinstance(v, Placement):
                v = CallPlan(v)
            out.append((c, v))
        return cls(num_devices, tuple(out), fusion, name)

    def __getitem__(self, call: str) -> CallPlan:
        for c, cp in self.calls:
            if c == call:
                return cp
        raise KeyError(f"unknown call {call!r}; known: {CALLS}")

    def __iter__(self) -> Iterator[tuple[str, CallPlan]]:
        return iter(self.calls)

    def placement(self, call: str) -> Placement:
        return self[call].placement

    def replace_call(self, call: str, new: CallPlan) -> "ExecutionPlan":
        return ExecutionPlan(self.num_devices, tuple((c, new if c == call else cp)
                                                     for c, cp in self.calls), self.fusion,
                             self.name)

    def with_fusion(self, fusion: Fusion) -> "ExecutionPlan":
        return ExecutionPlan(self.num_devices, self.calls, fusion, self.name)

    def renamed(self, name: str) -> "ExecutionPlan":
        return ExecutionPlan(self.num_devices, self.calls, self.fusion, name)

    def key(self) -> tuple:
        """Hashable identity (what a cache of evaluated plans is keyed by)."""
        return (self.num_devices,
                tuple((str(cp.placement), cp.micro_batches) for _, cp in self.calls),
                self.fusion)

    # -- derived -------------------------------------------------------------------------------

    def reallocations(self) -> list[Realloc]:
        """Weight copies the plan implies: trained weights to the call that uses them
        next, when the placements differ (ReaLHF's realloc hook)."""
        out = []
        for model, src, dst in REALLOC_EDGES:
            ps, pd = self.placement(src), self.placement(dst)
            if ps != pd:
                out.append(Realloc(model, src, dst, ps, pd))
        return out

    def devices_of(self, call: str) -> frozenset[int]:
        return frozenset(self.placement(call).devices)

    def to_placement_overrides(self) -> dict[str, str]:
        """``placement.<call>`` config values (``fusedrl train --set KEY=VALUE``) and
        ``cluster.devices``; together they make a config run this plan."""
        out = {f"placement.{c}": str(cp.placement) for c, cp in self.calls}
        out["cluster.devices"] = str(self.num_devices)
        return out

    def micro_batch_size(self, call: str, mini_batch_size: int) -> int:
        """Samples per micro-batch of a training call on one dp rank."""
        if call not in TRAIN_CALLS:
            raise PlanError(f"micro_batch_size: {call!r} is not a training call {TRAIN_CALLS}")
        cp = self[call]
        per_rank, rem = divmod(mini_batch_size, cp.placement.layout.dp * cp.micro_batches)
        if rem or per_rank < 1:
            raise PlanError(f"plan field calls.{call}.micro_batches: dp={cp.placement.layout.dp} x "
                            f"micro_batches={cp.micro_batches} does not divide "
                            f"mini_batch_size={mini_batch_size}")
        return per_rank

    # -- YAML ----------------------------------------------------------------------------------

    def to_dict(self, predicted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["devices"] = self.num_devices
        out["calls"] = {c: {"placement": str(cp.placement), "micro_batches": cp.micro_batches}
                        for c, cp in self.calls}
        out["fusion"] = {"inter_stage": self.fusion.inter_stage,
                         "rt_policy": self.fusion.rt_policy,
                         "intra_stage": self.fusion.intra_stage}
        out["reallocations"] = [str(r) for r in self.reallocations()]
        if predicted:
            out["predicted"] = dict(predicted)
        return out

    def to_yaml(self, predicted: Mapping[str, Any] | None = None) -> str:
        """YAML text; ``predicted`` (e.g. iteration seconds) is written for reading."""
        return yaml.safe_dump(self.to_dict(predicted), sort_keys=False, default_flow_style=None,
                              width=120)

    @classmethod
    def from_dict(cls, tree: Any) -> "ExecutionPlan":
        if not isinstance(tree, dict):
            raise PlanError("plan: top level must be a mapping with devices, calls, fusion")
        known = {"name", "devices", "calls", "fusion", "reallocations", "predicted"}
        unknown = sorted(set(tree) - known)
        if unknown:
            raise PlanError(f"plan field {unknown[0]}: unknown (known: {', '.join(sorted(known))})")
        if "devices" not in tree:
            raise PlanError("plan field devices: missing")
        devices = tree["devices"]
        if not isinstance(devices, int) or isinstance(devices, bool):
            raise PlanError(f"plan field devices: must be an integer, got {devices!r}")
        calls_tree = tree.get("calls")
        if not isinstance(calls_tree, dict):
            raise PlanError("plan field calls: missing or not a mapping of call -> "
                            "{placement, micro_batches}")
        calls: dict[str, CallPlan] = {}
        for c, v in calls_tree.items():
            if c not in CALLS:
                raise PlanError(f"plan field calls.{c}: unknown call; known: {', '.join(CALLS)}")
            if isinstance(v, str):
                v = {"placement": v}
            if not isinstance(v, dict):
                raise PlanError(f"plan field calls.{c}: expected a mapping with placement, "
                                f"micro_batches, got {v!r}")
            bad = sorted(set(v) - {"placement", "micro_batches"})
            if bad:
                raise PlanError(f"plan field calls.{c}.{bad[0]}: unknown (known: placement, "
                                "micro_batches)")
            if "placement" not in v:
                raise PlanError(f"plan field calls.{c}.placement: missing")
            try:
                placement = Placement.parse(str(v["placement"]))
            except ValueError as e:
                raise PlanError(f"plan field calls.{c}.placement: {e}") from None
            mb = v.get("micro_batches", 1)
            if not isinstance(mb, int) or isinstance(mb, bool):
                raise PlanError(f"plan field calls.{c}.micro_batches: must be an integer, got {mb!r}")
            calls[c] = CallPlan(placement, mb)
        fusion_tree = tree.get("fusion", {}) or {}
        if not isinstance(fusion_tree, dict):
            raise PlanError(f"plan field fusion: expected a mapping, got {fusion_tree!r}")
        bad = sorted(set(fusion_tree) - {"inter_stage", "rt_policy", "intra_stage"})
        if bad:
            raise PlanError(f"plan field fusion.{bad[0]}: unknown (known: inter_stage, rt_policy, "
                            "intra_stage)")
        fusion = Fusion(**fusion_tree)
        name = tree.get("name", "")
        return cls.make(devices, calls, fusion, str(name))

    @classmethod
    def from_yaml(cls, text: str) -> "ExecutionPlan":
        """Parse and validate; errors are :class:`PlanError` naming the field."""
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"plan: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(tree)

    @classmethod
    def load(cls, path) -> "ExecutionPlan":
        from pathlib import Path

        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {p} does not exist")
        try:
            return cls.from_yaml(p.read_text())
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from None

    def save(self, path, predicted: Mapping[str, Any] | None = None) -> None:
        from pathlib import Path

        Path(path).write_text(self.to_yaml(predicted))

    def __str__(self) -> str:
        width = max(len(c) for c in CALLS)
        lines = [f"{c:<{width}}  {str(cp.placement):<22} micro_batches={cp.micro_batches}"
                 for c, cp in self.calls]
        f = self.fusion
        lines.append(f"fusion: inter_stage={'on' if f.inter_stage else 'off'}"
                     f" (Rt policy {f.rt_policy}), intra_stage={f.intra_stage}")
        for r in self.reallocations():
            lines.append(f"realloc {r}")
        return "\n".join(lines)
