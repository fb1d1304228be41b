"""Parameter reallocation between placements (ReaLHF, Mei et al., arXiv 2406.14088):
every model function call runs on its own placement, and weights are resharded between
placements moving only what a destination device does not already hold, with no full
gather on one device.

- :mod:`fusedrl.realloc.plan`: which byte ranges each destination needs from which
  source (:func:`plan_realloc`, ReaLHF §4's reallocation plan), broadcast groups;
- :mod:`fusedrl.realloc.executor`: the bucketed transfers of a plan over process groups
  (:class:`ReallocExecutor`);
- :mod:`fusedrl.realloc.weight_sync`: the copies a run makes (training -> generation,
  inference and the one-device copies that inter-stage fusion's freed devices receive),
  each worker's plans and executors built once, and dropping/re-allocating inference
  copies between iterations;
- :mod:`fusedrl.realloc.local`, :mod:`fusedrl.realloc.shm`: single-host transports.
"""

from fusedrl.realloc.executor import (
    Chunk,
    Message,
    ReallocExecutor,
    ReallocStats,
    build_schedule,
    split_region,
)
from fusedrl.realloc.plan import (
    BroadcastGroup,
    ReallocPlan,
    Transfer,
    minimum_bytes,
    plan_realloc,
)

__all__ = ["BroadcastGroup", "Chunk", "Message", "ReallocExecutor", "ReallocPlan",
           "ReallocStats", "Transfer", "build_schedule", "minimum_bytes", "plan_realloc",
           "split_region"]
