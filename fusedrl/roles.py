"""The one vocabulary of model roles: which network each model function call runs,
with which head, whether it trains, and where its weights come from.

Every module that names a call -- the config's ``placement.*`` keys, the execution
plan (:mod:`fusedrl.scheduler.plan`), the Ray workers, the reallocation pairs, the
simulator -- takes the names from :class:`Role` and the facts from :data:`ROLES`.
This module imports nothing from fusedrl (nor torch), so the config, layout and
scheduler modules may use it and stay at the bottom of the dependency graph.

Weights of a role without a source are loaded (a checkpoint, or the seed); a role with
a source receives them from it through the reallocation engine (ReaLHF, arXiv
2406.14088): ``"init"`` once at setup (the reference *is* the initial actor), ``"step"``
after every update (inference copies of a trained model).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    """A model function call of a PPO iteration (a ``str``: ``Role.REF == "ref"``)."""

    ACTOR_TRAIN = "actor_train"
    ACTOR_GEN = "actor_gen"
    ACTOR_INFER = "actor_infer"
    CRITIC_TRAIN = "critic_train"
    CRITIC_INFER = "critic_infer"
    REF = "ref"
    REWARD = "reward"

    def __str__(self) -> str:
        return self.value

    @property
    def spec(self) -> "RoleSpec":
        return ROLES[self]


@dataclass(frozen=True)
class RoleSpec:
    """What a role is."""

    model: str
    """The network whose weights it runs: ``actor``, ``critic``, ``ref`` or ``reward``."""
    head: str
    """``lm`` (token log-probs) or ``value`` (a scalar per position)."""
    trainable: bool
    """Holds an optimizer and is updated by PPO."""
    call: str
    """What it computes: ``train``, ``generate``, ``logp``, ``values`` or ``score``."""
    source: Role | None = None
    """The role its weights are copied from (reallocation), or None: loaded."""
    refresh: str | None = None
    """When the copy is made: ``init`` (once) or ``step`` (after every update)."""
    description: str = ""


ROLES: dict[Role, RoleSpec] = {
    Role.ACTOR_TRAIN: RoleSpec("actor", "lm", True, "train",
                               description="Actor training (PPO policy update)."),
    Role.ACTOR_GEN: RoleSpec("actor", "lm", False, "generate", Role.ACTOR_TRAIN, "step",
                             "Rollout generation."),
    Role.ACTOR_INFER: RoleSpec("actor", "lm", False, "logp", Role.ACTOR_TRAIN, "step",
                               "Old log-probs of the rollouts (the behaviour policy)."),
    Role.CRITIC_TRAIN: RoleSpec("critic", "value", True, "train",
                                description="Critic training (value update)."),
    Role.CRITIC_INFER: RoleSpec("critic", "value", False, "values", Role.CRITIC_TRAIN, "step",
                                "Critic values of the rollouts."),
    Role.REF: RoleSpec("ref", "lm", False, "logp", Role.ACTOR_TRAIN, "init",
                       "Reference-model log-probs (KL penalty)."),
    Role.REWARD: RoleSpec("reward", "value", False, "score",
                          description="Reward-model scores (reward.type: model)."),
}

PLACEMENT_ROLES: tuple[Role, ...] = tuple(Role)
"""Every role has a ``placement.<role>`` key."""
TRAIN_ROLES = (Role.ACTOR_TRAIN, Role.CRITIC_TRAIN)
FROZEN_ROLES = (Role.REF, Role.REWARD)
"""Never trained nor refreshed: held in ``model.frozen_dtype`` (bfloat16 by default)."""
INFERENCE_ROLES = (Role.ACTOR_INFER, Role.REF, Role.CRITIC_INFER, Role.REWARD)
"""The inference calls of an iteration, in the order their results are used."""


def heads() -> dict[Role, str]:
    """``role -> head`` of every role."""
    return {r: s.head for r, s in ROLES.items()}


def copy_pairs(refresh: str) -> tuple[tuple[Role, Role], ...]:
    """``(source, destination)`` of every copy made at ``refresh`` (init or step)."""
    return tuple((s.source, r) for r, s in ROLES.items() if s.refresh == refresh)
