"""Inter-stage fusion (RLHFuse, arXiv 2409.13221 §4): generation and inference of one
iteration fused at the level of samples.

One shared sample queue feeds every generation instance; finished samples stream to
inference in micro-batches; when fewer than ``Rt`` samples are still generating, the
long tail migrates onto fewer instances (RLHFuse's rule,
:func:`fusedrl.scheduler.migration.plan_migration`) and the freed devices receive the
inference models through the reallocation engine and start inference at once.

- :mod:`fusedrl.interstage.rollout`: the controller's loop, the ``interstage`` rollout
  stage (:class:`InterStageRollout`) and the one-device copies freed devices receive
  (:func:`serve_copies`);
- :mod:`fusedrl.interstage.worker`: the worker's step-level engine and per-micro-batch
  inference;
- the policies that choose ``Rt`` and plan a migration are pure scheduling code in
  :mod:`fusedrl.scheduler.interstage` (a registry: ``fusion.interstage_policy``).

Switch: ``fusion.interstage`` (:func:`fusedrl.validate.interstage_enabled`).
"""

from fusedrl.interstage.rollout import InterStageRollout, serve_copies
from fusedrl.interstage.worker import InterStageWorker

__all__ = ["InterStageRollout", "InterStageWorker", "serve_copies"]
