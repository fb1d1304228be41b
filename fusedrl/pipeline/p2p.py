"""Point-to-point transfers between pipeline stages (world ranks = device ids).

Sends are non-blocking (``isend``) and receives blocking: a stage never waits for its
neighbour to *take* a tensor, only for the tensors it needs, so a 1F1B schedule whose
dependency graph is acyclic cannot deadlock on gloo (whose blocking ``send`` would wait
for the matching ``recv``). Messages between one ordered pair of ranks arrive in the
order they were sent; within one call every pair carries one kind of message in one
direction (activations downstream, gradients upstream), so no tags are needed.

Each message goes on the channel group of its pipeline and direction
(:meth:`fusedrl.runtime.groups.PlacementGroups.link`): NCCL runs a group's operations in
posting order on one stream, so activations and gradients between two stages must not
share one, or "send ``i+1``, receive gradient ``i``" on one side and "send gradient
``i``, receive ``i+1``" on the other wait for each other. Receive buffers are allocated
on ``device`` (the stage model's), so the same code runs over gloo on CPU and NCCL on GPU.

Lifecycle: ``comm = P2P(device)``; ``comm.send(t, dst, group)`` /
``comm.recv(shape, dtype, src, group)``; ``comm.flush()`` before the sent tensors may be
reused or freed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class P2P:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._pending: list[tuple[object, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
        t = tensor.detach().contiguous()
        self._pending.append((dist.isend(t, dst, group=group, tag=tag), t))

    def recv(self, shape, dtype: torch.dtype, src: int, group=None, tag: int = 0) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        dist.recv(t, src, group=group, tag=tag)
        return t

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
