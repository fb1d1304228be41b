"""fusedrl.realloc: parameter reallocation between placements (ReaLHF, arXiv 2406.14088)."""

from fusedrl.realloc.plan import (
    BroadcastGroup,
    ReallocPlan,
    Transfer,
    minimum_bytes,
    plan_realloc,
)

__all__ = ["BroadcastGroup", "ReallocPlan", "Transfer", "minimum_bytes", "plan_realloc"]
