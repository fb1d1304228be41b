"""The fused-schedule problem families of RLHFuse §5's evaluation.

The actor's pipeline spans all ``N`` nodes in order; the critic's pipelines run in
the opposite stage order. With ``K`` critic pipelines of ``N / K`` stages (RLHFuse
§5: ``K1·N1 = K2·N2 = N``; ``K = 1`` or ``2`` in its evaluation), critic ``r`` spans
nodes ``r*N/K .. (r+1)*N/K - 1`` reversed and trains ``microbatches / K`` of the
micro-batches (data parallelism over the same mini-batch). Every stage of a pipeline
takes ``fwd`` per forward and ``bwd`` per backward (RLHFuse: backward = 2 × forward)
and holds ``mem`` per outstanding micro-batch.

:func:`actor_critic_problem` builds one instance; :func:`family_instances` draws a
reproducible set of the published family (8 or 16 nodes, one or two critics, 4 to 64
micro-batches, integer forward times with backward = 2 × forward, a different
activation memory per pipeline) for the quality benchmark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def actor_critic_problem(stages: int, ratio: int, microbatches: int, fwd: float = 1.0,
                         bwd: float = 2.0, mem: float = 1.0, critic_fwd: float | None = None,
                         critic_bwd: float | None = None, critic_mem: float | None = None) -> dict[str, Any]:
    """The JSON problem of one family instance (see the module doc).

    ``fwd``/``bwd``/``mem`` are the actor's per-stage values; the ``critic_*`` ones
    default to them. ``ratio`` is ``K``, the number of critic pipelines.
    """
    if ratio < 1 or stages % ratio or microbatches % ratio:
        raise ValueError(f"ratio: {ratio} must divide stages ({stages}) and microbatches ({microbatches})")
    per = stages // ratio
    pipelines = [{"name": "actor", "stage_nodes": list(range(stages)), "microbatches": microbatches,
                  "fwd": fwd, "bwd": bwd, "mem": mem}]
    for r in range(ratio):
        pipelines.append({
            "name": "critic" if ratio == 1 else f"critic{r}",
            "stage_nodes": [(r + 1) * per - 1 - s for s in range(per)],
            "microbatches": microbatches // ratio,
            "fwd": fwd if critic_fwd is None else critic_fwd,
            "bwd": bwd if critic_bwd is None else critic_bwd,
            "mem": mem if critic_mem is None else critic_mem,
        })
    return {"nodes": stages, "pipelines": pipelines}


@dataclass(frozen=True)
class FamilyInstance:
    """One instance of the published family (all fields integers)."""

    nodes: int  # 8 or 16
    critics: int  # K: 1 (one reversed critic over all nodes) or 2 (two, each over its half)
    microbatches: int  # the actor's; each critic pipeline trains microbatches / critics
    actor_fwd: int  # per stage; backward = 2 x forward
    critic_fwd: int  # per critic stage (a critic stage holds K times the layers of an actor one)
    actor_mem: int  # activation memory per outstanding micro-batch, per stage
    critic_mem: int

    @property
    def name(self) -> str:
        return (f"N{self.nodes}K{self.critics}M{self.microbatches}"
                f"f{self.actor_fwd},{self.critic_fwd}m{self.actor_mem},{self.critic_mem}")

    def problem(self) -> dict[str, Any]:
        return actor_critic_problem(self.nodes, self.critics, self.microbatches,
                                    fwd=self.actor_fwd, bwd=2 * self.actor_fwd, mem=self.actor_mem,
                                    critic_fwd=self.critic_fwd, critic_bwd=2 * self.critic_fwd,
                                    critic_mem=self.critic_mem)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MICROBATCHES = (4, 6, 8, 12, 16, 24, 32, 48, 64)
"""Micro-batch counts drawn from (4 to 64; even, so that two critics split them)."""


def family_instances(count: int, seed: int = 0, max_fwd: int = 4, max_mem: int = 4) -> list[FamilyInstance]:
    """``count`` reproducible instances of the published family.

    Instances cycle through the four layouts (8/16 nodes x 1/2 critics) so any
    ``count >= 4`` covers each; micro-batches cycle through :data:`MICROBATCHES` in a
    shuffled order; forward times are drawn from ``1..max_fwd`` and memories from
    ``1..max_mem``, the actor's and critic's independently (redrawn until the two
    pipelines differ in memory, as RLHFuse's models do).
    """
    if count < 1:
        raise ValueError(f"count: must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    layouts = [(n, k) for n in (8, 16) for k in (1, 2)]
    mbs = list(MICROBATCHES)
    out: list[FamilyInstance] = []
    for i in range(count):
        if i % len(mbs) == 0:
            rng.shuffle(mbs)
        nodes, critics = layouts[i % len(layouts)]
        actor_mem, critic_mem = 1, 1
        while actor_mem == critic_mem:
            actor_mem, critic_mem = (int(v) for v in rng.integers(1, max_mem + 1, size=2))
        out.append(FamilyInstance(
            nodes=nodes, critics=critics, microbatches=mbs[i % len(mbs)],
            actor_fwd=int(rng.integers(1, max_fwd + 1)), critic_fwd=int(rng.integers(1, max_fwd + 1)),
            actor_mem=actor_mem, critic_mem=critic_mem))
    return out
