"""Intra-stage fusion (RLHFuse, arXiv 2409.13221 §5): the actor's and the critic's
training pipelines interleaved on the same devices in one fused schedule.

The critic's stages are placed in reverse over the actor's devices (``dp1tp1pp2@0-1``
and ``dp1tp1pp2@1,0``), so that each pipeline's warm-up and drain bubbles fall where
the other pipeline has work. The schedule is searched by the scheduler library
(:mod:`fusedrl.scheduler.pipeline_search`: simulated annealing over task orders,
makespan first; RLHFuse §5) from per-stage times profiled on the real models, and run
task by task on each worker (:mod:`fusedrl.pipeline.fused`). The PPO update around it
is the shared one (:func:`fusedrl.update.run_update`): the fused schedule only changes
the order in which micro-batches flow, so the weights after a step equal those of the
two 1F1B pipelines run one after the other.

Switch: ``fusion.intrastage`` (checked by :func:`fusedrl.validate.check_intrastage`).
"""

from fusedrl.intrastage.training import FusedTraining, fused_forward_backward, worker_profile

__all__ = ["FusedTraining", "fused_forward_backward", "worker_profile"]
