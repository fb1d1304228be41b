"""Partial rollouts: close the batch at its target count and carry the rest over.

Long-tailed output lengths keep a synchronous iteration waiting for its longest
sample. A partial rollout (Kimi k1.5, arXiv 2501.12599 §2.6.2; APRIL in slime,
arXiv 2509.18521; AReaL's bounded staleness, arXiv 2505.24298 §4) instead launches
more samples than the batch needs, closes the batch as soon as ``target`` groups
(a prompt's ``actor.rollout_n`` samples) have finished, aborts the unfinished ones
and resumes them first in the next iteration, under the new weights. The tokens a
carried sample generated under older weights stay in it; the loss corrects for them
with the log-probs the sampling policy recorded per token (behaviour log-probs,
:func:`fusedrl.algorithms.ppo.policy_loss`), and ``max_staleness`` bounds how many
weight updates separate a sample's oldest token from the weights it is trained from
(AReaL's ``max_staleness``: 1 by default).

:class:`PartialRolloutPolicy` is an :class:`~fusedrl.scheduler.interstage.InterStagePolicy`
registered as ``partial``: it migrates nothing (the tail is carried over, not
migrated) and adds the sample-level decisions, all pure functions of ids, versions
and counts, which the runtime (:mod:`fusedrl.partial`) executes::

    policy = get_policy("partial", cost=cost, num_instances=n, max_batch=64,
                        oversample=1.0, max_staleness=1)
    order = policy.carry_order(carried)                 # resumed first, oldest first
    restart = [c for c in carried if policy.too_stale(c.first_version, version)]
    must = [c for c in carried if policy.must_finish(c.first_version, version)]
    new = policy.launch(target, carried_groups)         # groups to start from the data
    ... generate; the batch closes when policy.closes(done_groups, target) and every
    ... group at the staleness bound (``must``) is complete: it cannot be carried again,
    ... so the long tail gets ``max_staleness + 1`` iterations to finish, not one.

A user policy subclasses it (``partial`` behaviour is ``isinstance`` of this class,
:func:`is_partial`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from .gen_cost import GenCostModel
from .interstage import _REGISTRY, InterStagePolicy, _check_batch, register_policy

__all__ = ["CarriedSample", "PartialRolloutPolicy", "is_partial"]


@dataclass(frozen=True)
class CarriedSample:
    """A sample carried into the next iteration: its id, tokens generated so far and the
    weight version that sampled its first token (None: no token yet)."""

    sample_id: int
    generated: int
    first_version: int | None


@register_policy("partial")
class PartialRolloutPolicy(InterStagePolicy):
    """Partial rollouts (module docstring).

    ``oversample``: samples in flight beyond the batch, as a fraction of it (groups
    launched = ``ceil(target * (1 + oversample))`` minus the groups carried over);
    ``max_staleness``: a sample is trained from weights at most this many updates
    newer than those that sampled its oldest token; an older carried sample restarts
    from its prompt (its tokens are wasted).
    """

    partial: ClassVar[bool] = True

    def __init__(self, cost: GenCostModel, num_instances: int, max_batch: int, *,
                 oversample: float = 1.0, max_staleness: int = 1):
        super().__init__(cost, num_instances, max_batch)
        if not oversample >= 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.oversample, self.max_staleness = float(oversample), int(max_staleness)

    def threshold(self, batch_size: int) -> int:
        """No migration: the long tail is cut at the target count and carried over."""
        _check_batch(batch_size)
        return 0

    def plan(self, remaining_per_instance, *, threshold, max_sample_tokens):
        return None

    def launch(self, target: int, carried_groups: int) -> int:
        """Groups to start from the data this iteration: enough that ``target`` groups
        can close the batch while ``oversample`` x ``target`` more are in flight."""
        _check_batch(target)
        if carried_groups < 0:
            raise ValueError(f"carried_groups must be >= 0, got {carried_groups}")
        return max(0, math.ceil(target * (1 + self.oversample) - 1e-9) - carried_groups)

    def closes(self, done_groups: int, target: int) -> bool:
        """Whether the batch closes: ``target`` groups have all their samples."""
        return done_groups >= target

    def too_stale(self, first_version: int | None, version: int) -> bool:
        """Whether a sample whose oldest token was sampled by weights ``first_version``
        may not be trained from weights ``version`` (it then restarts from its prompt)."""
        return first_version is not None and version - first_version > self.max_staleness

    def must_finish(self, first_version: int | None, version: int) -> bool:
        """Whether a carried sample is at the staleness bound: it cannot be carried again,
        so the batch of weights ``version`` waits for it (and its group)."""
        return first_version is not None and version - first_version == self.max_staleness

    def carry_order(self, carried: Sequence[CarriedSample]) -> list[CarriedSample]:
        """The order carried samples resume in, ahead of new ones: the oldest first
        (closest to the staleness bound), then by sample id (data order)."""
        return sorted(carried, key=lambda c: (c.first_version is None,
                                              c.first_version or 0, c.sample_id))


def is_partial(name: str) -> bool:
    """Whether the policy registered as ``name`` runs partial rollouts."""
    cls = _REGISTRY.get(name)
    return cls is not None and issubclass(cls, PartialRolloutPolicy)
