"""Starting or joining Ray, and choosing the trainer for a config."""

from __future__ import annotations

import os

LOCAL_PATH_NOTE = ("fast path: cluster.devices == 1 and every placement dp1tp1pp1@0 runs the "
                   "in-process single-device trainer")


def ensure_ray(address: str, num_devices: int) -> bool:
    """Join the Ray cluster at ``address`` (``ray start --head`` printed it), or start a
    local instance with a CPU per device. Returns True when this call started or joined
    Ray (and the caller should shut it down), False when Ray was already initialised
    (tests share one session)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(num_devices, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True)
    return True


def is_single_device(config) -> bool:
    return config.cluster.devices == 1 and config.placement.is_trivial()


def make_trainer(config, setup=None):
    """The in-process :class:`~fusedrl.trainer.PPOTrainer` for one device with trivial
    placements, else the Ray runtime's :class:`DistributedPPOTrainer` (same interface)."""
    if is_single_device(config):
        from fusedrl.trainer import PPOTrainer

        return PPOTrainer(config, setup)
    from fusedrl.runtime.controller import DistributedPPOTrainer

    return DistributedPPOTrainer(config, setup)
