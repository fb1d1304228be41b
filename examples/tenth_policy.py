"""A custom inter-stage migration policy (RLHFuse §4): migrate the long tail once a tenth
of the batch is still generating.

    fusedrl train --plugin examples/tenth_policy.py --set fusion.interstage_policy=tenth \
        --set cluster.devices=2 --set placement.default=dp2tp1pp1@0-1

A policy chooses the threshold ``Rt`` (samples still generating) below which the
remaining samples move onto fewer generation instances, freeing the others for
inference. ``threshold`` is asked once per iteration, before generation; the inherited
``plan`` applies RLHFuse's rule to pick the instances that keep the samples, and
``observe`` (ignored here) sees every iteration's output lengths, for a policy that
adapts (the built-in ``rlhfuse`` simulates candidates over them).
"""

from fusedrl.scheduler.interstage import InterStagePolicy, register_policy


@register_policy("tenth")
class TenthPolicy(InterStagePolicy):
    """``Rt = batch_size // 10`` (the built-in ``fixed`` policy uses 20%)."""

    def threshold(self, batch_size: int) -> int:
        return batch_size // 10
