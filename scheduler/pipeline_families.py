"""The fused-schedule problem families of RLHFuse §5's evaluation.

The actor's pipeline spans all ``stages`` nodes in order; the critic's pipelines
run in the opposite stage order. With actor:critic stage ratio ``k:1`` there are
``k`` critic replicas of ``stages / k`` stages, replica ``r`` spanning nodes
``r*stages/k .. (r+1)*stages/k - 1`` reversed (K1·N1 = K2·N2 = N), and each
replica trains ``microbatches / k`` of the micro-batches (data parallelism over
the same mini-batch). Every stage takes ``fwd`` per forward and ``bwd`` per
backward (RLHFuse: backward = 2 × forward) and holds ``mem`` per outstanding
micro-batch.
"""

from __future__ import annotations

from typing import Any


def actor_critic_problem(stages: int, ratio: int, microbatches: int, fwd: float = 1.0,
                         bwd: float = 2.0, mem: float = 1.0) -> dict[str, Any]:
    """The JSON problem of one family instance (see the module doc)."""
    if stages % ratio or microbatches % ratio:
        raise ValueError(f"ratio {ratio} must divide stages ({stages}) and microbatches ({microbatches})")
    per = stages // ratio
    pipelines = [{"name": "actor", "stage_nodes": list(range(stages)), "microbatches": microbatches,
                  "fwd": fwd, "bwd": bwd, "mem": mem}]
    for r in range(ratio):
        pipelines.append({
            "name": "critic" if ratio == 1 else f"critic{r}",
            "stage_nodes": [(r + 1) * per - 1 - s for s in range(per)],
            "microbatches": microbatches // ratio,
            "fwd": fwd, "bwd": bwd, "mem": mem,
        })
    return {"nodes": stages, "pipelines": pipelines}
