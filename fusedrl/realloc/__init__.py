"""fusedrl.realloc: parameter reallocation between placements (ReaLHF, arXiv 2406.14088)."""

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
