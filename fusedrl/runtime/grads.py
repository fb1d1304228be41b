"""Gradient synchronisation of one model shard: data-parallel all-reduce (bucketed,
overlapped with the last backward), replicated-kv-head reduction, and global-norm
clipping across model-parallel ranks. Buckets and the norm live on the parameters'
device, so the reductions run over gloo on CPU and NCCL on GPU alike.

Data parallelism follows PyTorch DDP / Megatron's ``DistributedDataParallel``:
parameters are packed into buckets in reverse order (roughly the order backward
produces their gradients); during a rank's last backward of a mini-batch, a
post-accumulate-grad hook marks a parameter ready and a bucket whose parameters are
all ready is all-reduced asynchronously while backward goes on. Buckets are launched
strictly in bucket order (a ready bucket waits for its predecessors), so every dp rank
issues the same collectives in the same order, including a rank that had no
micro-batch and launches everything in :meth:`GradReducer.finish`. Gradients are
*summed*: the update weights every micro-batch loss by its share of the whole
mini-batch (:func:`fusedrl.update.run_update`), so the sum equals the single-device
gradient.

Lifecycle per mini-batch::

    reducer.zero_grad()
    ... forward/backward of the micro-batches, calling reducer.arm() before the last backward
    reducer.finish()              # all gradients reduced
    norm = clip_grad_norm(model, groups, max_norm)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fusedrl.models.sharding import KV, REPLICATED, param_kind

BUCKET_NUMEL = 1 << 20  # 4 MB of float32 per bucket (Megatron's default is 40M elements)


class GradReducer:
    def __init__(self, model: torch.nn.Module, groups, bucket_numel: int = BUCKET_NUMEL):
        self.model = model
        self.groups = groups
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.kv_params = [p for n, p in self.named if param_kind(n) == KV]
        self.buckets: list[list[torch.nn.Parameter]] = []
        if groups.dp_group is not None:
            cur, size = [], 0
            for _, p in reversed(self.named):
                cur.append(p)
                size += p.numel()
                if size >= bucket_numel:
                    self.buckets.append(cur)
                    cur, size = [], 0
            if cur:
                self.buckets.append(cur)
            self._bucket_of = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
            for _, p in self.named:
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._armed = False
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._works: list[tuple[object, torch.Tensor, list[torch.nn.Parameter]]] = []

    def zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None
        self._armed = False
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._works = []

    def arm(self) -> None:
        """The next backward is this rank's last of the mini-batch: reduce during it."""
        self._armed = True

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        b = self._bucket_of[id(p)]
        self._ready[b] += 1
        while self._next < len(self.buckets) and \
                self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        params = self.buckets[b]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        work = dist.all_reduce(flat, group=self.groups.dp_group, async_op=True)
        self._works.append((work, flat, params))
        self._next = b + 1

    def finish(self) -> None:
        """Complete the data-parallel reduction (launching buckets not yet launched) and
        sum the gradients of replicated kv heads over the ranks sharing them."""
        if self.buckets:
            while self._next < len(self.buckets):
                self._launch(self._next)
            for work, flat, params in self._works:
                work.wait()
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[offset:offset + n].view_as(p).clone()
                    offset += n
            self._works = []
        self._armed = False
        if self.groups.kv_share_group is not None and self.kv_params:
            # tp > num_kv_heads: each of these ranks used the shared head for its own query
            # heads only, so the head's gradient is the sum of their partial gradients.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in self.kv_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.groups.kv_share_group)
            offset = 0
            for p in self.kv_params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()


def _counted(name: str, groups) -> bool:
    """Whether this rank's copy of ``name`` counts towards the global norm: a parameter
    replicated over tp ranks is counted on one of them only (Megatron's
    ``param_is_not_tensor_parallel_duplicate``)."""
    kind = param_kind(name)
    if kind == REPLICATED:
        return groups.coord.tp == 0
    if kind == KV and groups.kv_share > 1:
        return groups.coord.tp % groups.kv_share == 0
    return True


def clip_grad_norm(model: torch.nn.Module, groups, max_norm: float) -> float:
    """Clip gradients to a global L2 norm over all shards of one model replica; returns
    the norm before clipping (``torch.nn.utils.clip_grad_norm_`` semantics: coefficient
    ``max_norm / (norm + 1e-6)`` capped at 1; ``max_norm <= 0`` only measures)."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    # On the gradients' device: the sum stays there and the all-reduce takes the
    # device's backend (NCCL on GPU); one host sync when the norm is read.
    device = named[0][1].device if named else next(model.parameters()).device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for n, p in named:
        if _counted(n, groups):
            sq += p.grad.detach().double().pow(2).sum()
    if groups.mp_group is not None:
        dist.all_reduce(sq, group=groups.mp_group)
    norm = math.sqrt(float(sq))
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for _, p in named:
                p.grad.mul_(coef)
    return norm
