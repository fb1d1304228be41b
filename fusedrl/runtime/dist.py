"""torch.distributed helpers shared by the controller and the workers."""

from __future__ import annotations

import torch.distributed as dist

_LOCAL_GROUP = None


def local_group():
    """A one-rank process group for models that run unsharded in this process.

    megatron-core's tensor-parallel layers take an explicit ``tp_group``; a model on a
    single device (the laptop CPU path, tests) gets this trivial group. If this
    process is not part of a distributed job yet, a gloo world of size 1 backed by an
    in-memory store is created for it.
    """
    global _LOCAL_GROUP
    if _LOCAL_GROUP is None:
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        rank = dist.get_rank()
        # new_group must be called by every rank with the same arguments; each rank asks
        # for a group containing only itself, so create one per rank in order.
        groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
        _LOCAL_GROUP = groups[rank]
    return _LOCAL_GROUP
