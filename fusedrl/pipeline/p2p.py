"""Point-to-point transfers between pipeline stages (world ranks = device ids).

Sends are non-blocking (``isend``) and receives blocking: a stage never waits for its
neighbour to *take* a tensor, only for the tensors it needs, so a 1F1B schedule whose
dependency graph is acyclic cannot deadlock on gloo (whose blocking ``send`` would wait
for the matching ``recv``). Messages between one ordered pair of ranks arrive in the
order they were sent; within one call every pair carries one kind of message in one
direction (activations downstream, gradients upstream), so no tags are needed.

Lifecycle: ``comm = P2P()``; ``comm.send(t, dst)`` / ``comm.recv(shape, dtype, src)``;
``comm.flush()`` before the sent tensors may be reused or freed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class P2P:
    def __init__(self):
        self._pending: list[tuple[object, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        t = tensor.detach().contiguous()
        self._pending.append((dist.isend(t, dst), t))

    def recv(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype)
        dist.recv(t, src)
        return t

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
