"""Inter-stage fusion policies: when to migrate the long tail (RLHFuse §4).

RLHFuse (arXiv 2409.13221 §4) overlaps the long tail of generation with the
inference stage: when the samples still generating drop below a threshold ``Rt``
they migrate onto a few instances (:func:`plan_migration`), and the freed
instances start inference at once. ``Rt`` is the policy's choice. A policy is an
:class:`InterStagePolicy`; the runtime and the simulator drive it the same way::

    policy = get_policy("rlhfuse", cost=cost, num_instances=n, max_batch=64)
    for iteration in ...:
        rt = policy.threshold(batch_size)          # before generation starts
        ...                                        # generate; when remaining < rt:
        plan = policy.plan(remaining_per_instance, threshold=rt,
                           max_sample_tokens=prompt_len + max_new_tokens)
        ...                                        # execute plan (None: do not migrate)
        policy.observe(output_lengths, prompt_lengths)   # after the iteration

Policies are registered by name (:func:`register_policy`, :func:`get_policy`):
``"rlhfuse"`` (default; ``Rt`` chosen by simulating the iteration over the
observed length distribution and re-tuned every few iterations), ``"fixed"``
(``Rt`` a fixed fraction of the batch), ``"none"`` (never migrate). A user policy
subclasses :class:`InterStagePolicy` and registers itself::

    @register_policy("mine")
    class Mine(InterStagePolicy):
        def threshold(self, batch_size): return batch_size // 10
"""

from __future__ import annotations

from collections import deque
from typing import Callable, ClassVar, Mapping, Sequence, TypeVar

import numpy as np

from .gen_cost import GenCostModel
from .gen_sim import GenSimResult, simulate
from .migration import (KV_TRANSFER, REPREFILL, MigrationPlan, SampleMove, SampleState,
                        choose_method, migration_instances, plan_migration, validate_plan)

__all__ = [
    "GenCostModel", "MigrationPlan", "SampleMove", "SampleState", "KV_TRANSFER", "REPREFILL",
    "choose_method", "migration_instances", "plan_migration", "validate_plan",
    "InterStagePolicy", "NoMigrationPolicy", "FixedThresholdPolicy", "RLHFusePolicy",
    "register_policy", "get_policy", "available_policies", "DEFAULT_POLICY",
]

DEFAULT_POLICY = "rlhfuse"

# RLHFuse §4 sweeps Rt over 5%..95% of the batch.
DEFAULT_CANDIDATES = tuple(round(0.05 * i, 2) for i in range(1, 20))


class InterStagePolicy:
    """Decides the migration threshold ``Rt`` and plans the migration.

    Lifecycle, per iteration: ``threshold(batch_size)`` once before generation
    (``Rt`` in samples; 0 disables migration); when the samples still generating
    fall below it, ``plan(remaining_per_instance, threshold=Rt, max_sample_tokens=M)``
    once (``None``: do not migrate); after the iteration, ``observe(lengths,
    prompt_lengths)`` with every sample's output (and prompt) length. The default
    ``plan`` is RLHFuse's rule with this policy's cost model.
    """

    name: ClassVar[str] = ""

    def __init__(self, cost: GenCostModel, num_instances: int, max_batch: int):
        if not isinstance(cost, GenCostModel):
            raise TypeError(f"cost must be a GenCostModel, got {type(cost).__name__}")
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.cost, self.num_instances, self.max_batch = cost, num_instances, max_batch

    def observe(self, lengths: Sequence[int], prompt_lengths: Sequence[int] | None = None
                ) -> None:
        """Record one finished iteration's output lengths (default: ignored)."""

    def threshold(self, batch_size: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement threshold()")

    def plan(self, remaining_per_instance: Mapping[int, Sequence[SampleState]], *,
             threshold: int, max_sample_tokens: int) -> MigrationPlan | None:
        return plan_migration(remaining_per_instance, threshold=threshold, cost=self.cost,
                              max_sample_tokens=max_sample_tokens)


_P = TypeVar("_P", bound=type[InterStagePolicy])
_REGISTRY: dict[str, type[InterStagePolicy]] = {}


def register_policy(name: str) -> Callable[[_P], _P]:
    """Class decorator registering an :class:`InterStagePolicy` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")

    def decorate(cls: _P) -> _P:
        if not (isinstance(cls, type) and issubclass(cls, InterStagePolicy)):
            raise TypeError(f"register_policy({name!r}): {cls!r} is not an "
                            "InterStagePolicy subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy name {name!r} is already registered to "
                             f"{_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_policy(name: str, **kwargs) -> InterStagePolicy:
    """A new instance of the policy registered as ``name`` (``kwargs`` to its class)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown inter-stage policy {name!r}; registered: "
                         f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@register_policy("none")
class NoMigrationPolicy(InterStagePolicy):
    """Never migrate: the unfused schedule."""

    def threshold(self, batch_size: int) -> int:
        _check_batch(batch_size)
        return 0

    def plan(self, remaining_per_instance, *, threshold, max_sample_tokens):
        return None


@register_policy("fixed")
class FixedThresholdPolicy(InterStagePolicy):
    """``Rt = round(fraction * batch_size)`` (RLHFuse found ~20% best)."""

    def __init__(self, cost: GenCostModel, num_instances: int, max_batch: int,
                 fraction: float = 0.2):
        super().__init__(cost, num_instances, max_batch)
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction

    def threshold(self, batch_size: int) -> int:
        _check_batch(batch_size)
        return int(round(self.fraction * batch_size))


@register_policy("rlhfuse")
class RLHFusePolicy(InterStagePolicy):
    """``Rt`` from simulating the iteration for every candidate (RLHFuse §4).

    For each candidate fraction of the batch (default 5%..95% in steps of 5%, plus
    0 = no migration, so the policy never predicts worse than unfused) the
    iteration's generation + inference is simulated
    (:func:`~fusedrl.scheduler.gen_sim.simulate`) with this policy's cost model
    over the lengths observed in the last ``window`` iterations; the fastest wins
    (ties: the smaller ``Rt``). The choice is re-tuned after every
    ``retune_every`` observed iterations, following the drift of the length
    distribution. Until the first observation ``Rt = default_fraction * batch``.
    When the observed window does not hold exactly ``batch_size`` samples, a batch
    is resampled from it with a fixed seed.
    """

    def __init__(self, cost: GenCostModel, num_instances: int, max_batch: int, *,
                 retune_every: int = 4, window: int = 2,
                 candidates: Sequence[float] = DEFAULT_CANDIDATES,
                 include_no_migration: bool = True, default_fraction: float = 0.2,
                 seed: int = 0):
        super().__init__(cost, num_instances, max_batch)
        if retune_every < 1:
            raise ValueError(f"retune_every must be >= 1, got {retune_every}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not candidates or not all(0 < c <= 1 for c in candidates):
            raise ValueError(f"candidates must be fractions in (0, 1], got {candidates!r}")
        if not 0 <= default_fraction <= 1:
            raise ValueError(f"default_fraction must be in [0, 1], got {default_fraction}")
        self.retune_every, self.window = retune_every, window
        self.candidates = tuple(candidates)
        self.include_no_migration = include_no_migration
        self.default_fraction, self.seed = default_fraction, seed
        self._history: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window)
        self._since_tune = 0
        self._fraction: float | None = None
        self.last_sweep: dict[int, float] = {}
        """``Rt -> simulated makespan`` of the latest tuning."""

    def observe(self, lengths: Sequence[int], prompt_lengths: Sequence[int] | None = None
                ) -> None:
        out = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if out.size == 0 or (out < 1).any():
            raise ValueError("lengths must be a non-empty list of lengths >= 1")
        prompts = (np.zeros_like(out) if prompt_lengths is None
                   else np.asarray(prompt_lengths, dtype=np.int64).reshape(-1))
        if prompts.shape != out.shape:
            raise ValueError(f"prompt_lengths has {prompts.size} entries, lengths {out.size}")
        self._history.append((out, prompts))
        self._since_tune += 1

    def threshold(self, batch_size: int) -> int:
        _check_batch(batch_size)
        if self._history and (self._fraction is None or self._since_tune >= self.retune_every):
            rt = self.tune(batch_size)
            self._fraction = rt / batch_size
            self._since_tune = 0
            return rt
        fraction = self.default_fraction if self._fraction is None else self._fraction
        return int(round(fraction * batch_size))

    def candidate_thresholds(self, batch_size: int) -> list[int]:
        rts = {max(1, int(round(c * batch_size))) for c in self.candidates}
        if self.include_no_migration:
            rts.add(0)
        return sorted(rts)

    def workload(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The (output, prompt) lengths the tuning simulates."""
        if not self._history:
            raise ValueError("no observed lengths yet: call observe() first")
        out = np.concatenate([h[0] for h in self._history])
        prompts = np.concatenate([h[1] for h in self._history])
        if out.size != batch_size:
            idx = np.random.default_rng(self.seed).integers(0, out.size, size=batch_size)
            out, prompts = out[idx], prompts[idx]
        return out, prompts

    def simulate(self, batch_size: int, threshold: int | None) -> GenSimResult:
        """One simulated iteration over the observed workload (``None``: unfused)."""
        out, prompts = self.workload(batch_size)
        return simulate(out, self.cost, num_instances=self.num_instances,
                        max_batch=self.max_batch, prompt_lengths=prompts,
                        threshold=threshold, policy=self if threshold is not None else None)

    def tune(self, batch_size: int) -> int:
        """Sweep the candidate thresholds; return the best (also sets ``last_sweep``)."""
        _check_batch(batch_size)
        self.last_sweep = {rt: self.simulate(batch_size, rt).makespan_s
                           for rt in self.candidate_thresholds(batch_size)}
        return min(self.last_sweep, key=lambda rt: (self.last_sweep[rt], rt))

