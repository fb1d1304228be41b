"""The long-tail migration rule of inter-stage fusion (RLHFuse §4).

When the samples still generating drop below a threshold ``Rt``, RLHFuse
(arXiv 2409.13221 §4) moves them onto

    m = max(ceil(Rt / BSmax), ceil(Rt * M / C))

instances -- enough that no instance decodes more than ``BSmax`` sequences (the
batch that saturates it) and that the longest samples' KV caches fit (``M``: KV
bytes of the longest sample, ``C``: KV capacity of one instance). The ``m``
instances kept are the ones that already hold the most remaining samples, so the
fewest samples move; the other instances are freed for inference. A moved sample
continues where it stopped, either by transferring its KV cache or by
re-prefilling its prompt plus generated tokens on the destination, whichever the
cost model says is cheaper.

:func:`plan_migration` is a pure function of the per-instance state; the runtime
executes the :class:`MigrationPlan` it returns and the simulator
(:mod:`fusedrl.scheduler.gen_sim`) replays it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .gen_cost import GenCostModel

KV_TRANSFER = "kv"
REPREFILL = "reprefill"


@dataclass(frozen=True)
class SampleState:
    """A sample still generating: how many tokens its KV cache holds."""

    sample_id: int
    prompt_len: int
    generated: int

    @property
    def tokens(self) -> int:
        return self.prompt_len + self.generated


@dataclass(frozen=True)
class SampleMove:
    """One migrated sample: from instance ``src`` to ``dst`` by ``method``."""

    sample_id: int
    src: int
    dst: int
    method: str  # KV_TRANSFER | REPREFILL
    tokens: int  # prompt + generated tokens whose KV the destination needs
    cost_s: float  # the chosen method's modelled cost


@dataclass(frozen=True)
class MigrationPlan:
    """Where every remaining sample goes.

    ``kept``: instances that go on generating (they keep their own samples and
    receive ``moves``); ``freed``: instances that switch to inference. Every
    remaining sample is either on a kept instance already or moved exactly once.
    """

    threshold: int
    num_instances: int  # m of the rule (may exceed the instances holding samples)
    kept: tuple[int, ...]
    freed: tuple[int, ...]
    moves: tuple[SampleMove, ...]
    est_time_s: float
    """Modelled migration time: the busiest destination's serial sum of move costs."""

    @property
    def num_migrated(self) -> int:
        return len(self.moves)

    def destination(self) -> dict[int, int]:
        """``sample_id -> dst`` for the moved samples."""
        return {mv.sample_id: mv.dst for mv in self.moves}


def migration_instances(threshold: int, bs_max: int, max_sample_kv_bytes: float,
                        kv_capacity_bytes: float) -> int:
    """RLHFuse's ``m = max(ceil(Rt / BSmax), ceil(Rt * M / C))``, at least 1."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if bs_max < 1:
        raise ValueError(f"bs_max must be >= 1, got {bs_max}")
    if max_sample_kv_bytes < 0:
        raise ValueError(f"max_sample_kv_bytes must be >= 0, got {max_sample_kv_bytes}")
    if kv_capacity_bytes <= 0:
        raise ValueError(f"kv_capacity_bytes must be > 0, got {kv_capacity_bytes}")
    if max_sample_kv_bytes > kv_capacity_bytes:
        raise ValueError(f"max_sample_kv_bytes={max_sample_kv_bytes} exceeds "
                         f"kv_capacity_bytes={kv_capacity_bytes}: one sample cannot fit")
    by_batch = math.ceil(threshold / bs_max)
    # the ratio of two floats: guard the ceiling against rounding just above an integer
    by_memory = math.ceil(threshold * max_sample_kv_bytes / kv_capacity_bytes - 1e-9)
    return max(1, by_batch, by_memory)


def choose_method(cost: GenCostModel, tokens: int) -> tuple[str, float]:
    """KV-cache transfer or re-prefill for a sample holding ``tokens`` tokens.

    Transfer costs ``latency + tokens * kv_bytes_per_token / bandwidth``; re-prefill
    costs ``prefill_base + tokens * prefill_per_token``. Ties go to the transfer
    (it leaves the destination's compute free).
    """
    kv, pre = cost.kv_transfer_s(tokens), cost.reprefill_s(tokens)
    return (KV_TRANSFER, kv) if kv <= pre else (REPREFILL, pre)


def plan_migration(remaining_per_instance: Mapping[int, Sequence[SampleState]], *,
                   threshold: int, cost: GenCostModel,
                   max_sample_tokens: int) -> MigrationPlan | None:
    """Plan the migration of the remaining samples at threshold ``threshold``.

    ``remaining_per_instance``: every generation instance (also those holding no
    sample) mapped to the samples it is generating. ``max_sample_tokens``: prompt +
    response tokens of the longest sample (the caller's bound, e.g. prompt length +
    max new tokens); RLHFuse's ``M`` is its KV size. Returns ``None`` when ``m`` is
    not smaller than the number of instances (nothing to free).

    The kept instances are the ``m`` with the most remaining samples (ties: more
    tokens held, then the lower id). Moved samples go, longest first, to the kept
    instance with the fewest sequences (then fewest tokens), which bounds every
    receiving instance below ``BSmax`` and ``C / M`` sequences, the two limits the
    ``m`` formula provides for.
    """
    if not remaining_per_instance:
        raise ValueError("remaining_per_instance is empty: no generation instances")
    if max_sample_tokens < 1:
        raise ValueError(f"max_sample_tokens must be >= 1, got {max_sample_tokens}")
    seen: set[int] = set()
    for inst, samples in remaining_per_instance.items():
        for s in samples:
            if s.sample_id in seen:
                raise ValueError(f"remaining_per_instance: sample {s.sample_id} is listed "
                                 f"twice (again on instance {inst})")
            seen.add(s.sample_id)
    m = migration_instances(threshold, cost.bs_max, cost.kv_bytes(max_sample_tokens),
                            cost.kv_capacity_bytes)
    n = len(remaining_per_instance)
    if m >= n:
        return None

    def key(inst: int) -> tuple[int, int, int]:
        samples = remaining_per_instance[inst]
        return (-len(samples), -sum(s.tokens for s in samples), inst)

    order = sorted(remaining_per_instance, key=key)
    kept, freed = sorted(order[:m]), sorted(order[m:])

    # water-filling: least-loaded kept instance first
    heap = [(len(remaining_per_instance[k]), sum(s.tokens for s in remaining_per_instance[k]), k)
            for k in kept]
    heapq.heapify(heap)
    outgoing = [(s, src) for src in freed for s in remaining_per_instance[src]]
    outgoing.sort(key=lambda item: (-item[0].tokens, item[0].sample_id))
    moves: list[SampleMove] = []
    busy: dict[int, float] = {k: 0.0 for k in kept}
    for sample, src in outgoing:
        count, tokens, dst = heapq.heappop(heap)
        method, secs = choose_method(cost, sample.tokens)
        moves.append(SampleMove(sample.sample_id, src, dst, method, sample.tokens, secs))
        busy[dst] += secs
        heapq.heappush(heap, (count + 1, tokens + sample.tokens, dst))
    moves.sort(key=lambda mv: mv.sample_id)
    return MigrationPlan(threshold=threshold, num_instances=m, kept=tuple(kept),
                         freed=tuple(freed), moves=tuple(moves),
                         est_time_s=max(busy.values(), default=0.0))


def validate_plan(plan: MigrationPlan,
                  remaining_per_instance: Mapping[int, Sequence[SampleState]]) -> None:
    """Raise ``ValueError`` unless ``plan`` is executable on this state: kept and
    freed partition the instances, every sample of a freed instance moves exactly
    once from where it is to a kept instance, and nothing on a kept instance moves.
    (For plans from user policies; :func:`plan_migration` satisfies it.)"""
    instances = set(remaining_per_instance)
    kept, freed = set(plan.kept), set(plan.freed)
    if kept & freed or kept | freed != instances:
        raise ValueError(f"plan: kept {sorted(kept)} and freed {sorted(freed)} must "
                         f"partition the instances {sorted(instances)}")
    where = {s.sample_id: inst for inst, ss in remaining_per_instance.items() for s in ss}
    moved: set[int] = set()
    for mv in plan.moves:
        if mv.sample_id in moved:
            raise ValueError(f"plan moves sample {mv.sample_id} twice")
        moved.add(mv.sample_id)
        if where.get(mv.sample_id) != mv.src:
            raise ValueError(f"plan moves sample {mv.sample_id} from instance {mv.src}, "
                             f"but it is on {where.get(mv.sample_id)}")
        if mv.src not in freed or mv.dst not in kept:
            raise ValueError(f"plan moves sample {mv.sample_id} from {mv.src} to {mv.dst}: "
                             "must go from a freed instance to a kept one")
        if mv.method not in (KV_TRANSFER, REPREFILL):
            raise ValueError(f"plan: sample {mv.sample_id} has unknown method {mv.method!r}")
    stranded = sorted(sid for sid, inst in where.items() if inst in freed and sid not in moved)
    if stranded:
        raise ValueError(f"plan frees instances holding samples {stranded} without moving them")
