"""Shared-memory transport for reallocation between CPU workers on one host.

gloo moves CPU tensors over TCP, even on one machine: every byte is copied into the
kernel and out again, per receiver. Workers that share a host can instead exchange
pieces through shared memory, as NCCL does intra-node (its SHM/P2P transports): the
sender packs a message once into one of its ``inflight`` shared staging slots, and
every receiver copies it straight into its destination shard. Only two tiny tokens
per (message, receiver) cross gloo: *ready* (sender -> receiver) and *done*
(receiver -> sender, frees the slot for the sender's message ``j + inflight``).

Slots are files in ``/dev/shm`` named by a token that rank 0 broadcasts; each sender
creates its file, the receivers map it, then the file is unlinked (the mappings
stay valid), so nothing is left behind even if a worker dies later.

Lifecycle (driven by :class:`~fusedrl.realloc.executor.ReallocExecutor` with
``transport="shm"``; every step that says *world* is collective over all processes)::

    slots = ShmSlots.create(device_id, slot_numel, inflight, dtype)   # world
    slots.sender_slot(j)          # this sender's staging slot for its j-th message
    slots.peer_slot(src, j)       # src's slot for its j-th message, mapped here
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class ShmSlots:
    """``inflight`` staging slots per sending device, mapped by every receiver."""

    def __init__(self, inflight: int, slot_numel: dict[int, int],
                 mapped: dict[int, torch.Tensor]):
        self.inflight = inflight
        self.slot_numel = slot_numel
        self._mapped = mapped  # device -> flat tensor of inflight * slot_numel[device]

    @classmethod
    def create(cls, device_id: int, slot_numel: dict[int, int], peers: set[int],
               inflight: int, dtype: torch.dtype) -> "ShmSlots":
        """Collective over the world. ``slot_numel``: elements of one slot of every
        sending device (0: not a sender); ``peers``: senders this device receives from."""
        token = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        itemsize = torch.empty((), dtype=dtype).element_size()

        def path(dev: int) -> str:
            return str(SHM_DIR / f"fusedrl-realloc-{token[0]}-{dev}")

        mapped: dict[int, torch.Tensor] = {}
        mine = slot_numel.get(device_id, 0) * inflight
        if mine:
            with open(path(device_id), "wb") as f:
                f.truncate(mine * itemsize)
            mapped[device_id] = torch.from_file(path(device_id), shared=True, size=mine,
                                                dtype=dtype)
        dist.barrier()
        for dev in sorted(peers):
            mapped[dev] = torch.from_file(path(dev), shared=True,
                                          size=slot_numel[dev] * inflight, dtype=dtype)
        dist.barrier()
        if mine:
            os.unlink(path(device_id))
        return cls(inflight, slot_numel, mapped)

    def slot(self, device: int, ordinal: int) -> torch.Tensor:
        """The slot ``device`` stages its ``ordinal``-th sent message in."""
        n = self.slot_numel[device]
        k = ordinal % self.inflight
        return self._mapped[device][k * n:(k + 1) * n]
