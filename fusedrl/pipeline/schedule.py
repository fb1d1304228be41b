"""Pipeline execution of one stage: 1F1B training and pipelined forward.

Every rank of a placement runs the same function with its own stage of the model;
ranks of one dp replica process the same micro-batches in the same order. Stage ``s``
of ``pp`` stages receives activations from ``prev`` and sends its output to ``next``;
in training it receives output gradients back from ``next`` and sends input gradients
to ``prev``. Activation shapes are known on both sides (``[B, T, hidden]`` of the
micro-batch, whose token ids every stage holds), so no shape messages are exchanged.
A micro-batch is its token ids ``[B, T]`` or its packed rows
(:class:`fusedrl.packing.Packed`, whose positions and segment ids every stage's
forward takes).

1F1B (PipeDream-Flush, Narayanan et al. 2021; Megatron-LM's
``forward_backward_pipelining_without_interleaving``): stage ``s`` runs
``min(pp - s - 1, m)`` warm-up forwards, then alternates one forward and one backward,
then drains the remaining backwards, so at most ``pp - s`` micro-batches hold
activations at once.
"""

from __future__ import annotations

from typing import Callable

import torch

from fusedrl.packing import forward_kwargs, token_ids
from fusedrl.pipeline.p2p import P2P


def _hidden_shape(ids: torch.Tensor, hidden: int) -> tuple[int, int, int]:
    return (ids.shape[0], ids.shape[1], hidden)


def train_1f1b(model, groups, micro_ids: list[torch.Tensor],
               loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
               before_last_backward: Callable[[], None] | None = None) -> None:
    """Forward and backward ``micro_ids`` (token ids of each micro-batch, in order)
    through this stage, accumulating gradients.

    ``loss_fn(output, i)`` runs on the last stage and returns the scalar to
    differentiate for micro-batch ``i`` (already scaled). ``before_last_backward`` is
    called just before this stage's last backward (to arm overlapped gradient
    all-reduce).
    """
    m = len(micro_ids)
    pp = groups.placement.layout.pp
    stage = groups.coord.pp
    hidden = model.config.hidden_size
    param = next(model.parameters())
    dtype = model.activation_dtype
    comm = P2P(param.device)
    inputs: list[torch.Tensor | None] = [None] * m
    outputs: list[torch.Tensor | None] = [None] * m

    def forward(i: int) -> None:
        if groups.is_first:
            x = token_ids(micro_ids[i])
        else:
            x = comm.recv(_hidden_shape(micro_ids[i], hidden), dtype, groups.prev,
                          groups.link(groups.prev, 0, grad=False))
            x.requires_grad_(True)
        out = model(x, **forward_kwargs(micro_ids[i]))
        if groups.is_last:
            out = loss_fn(out, i)
        else:
            comm.send(out, groups.next, groups.link(groups.next, 0, grad=False))
        inputs[i], outputs[i] = x, out

    def backward(i: int) -> None:
        if i == m - 1 and before_last_backward is not None:
            before_last_backward()
        out = outputs[i]
        if groups.is_last:
            out.backward()
        else:
            grad = comm.recv(out.shape, out.dtype, groups.next,
                             groups.link(groups.next, 0, grad=True))
            out.backward(grad)
        if not groups.is_first:
            comm.send(inputs[i].grad, groups.prev, groups.link(groups.prev, 0, grad=True))
        inputs[i] = outputs[i] = None  # free activations

    warmup = min(pp - stage - 1, m)
    for i in range(warmup):
        forward(i)
    for i in range(warmup, m):
        forward(i)
        backward(i - warmup)
    for i in range(m - warmup, m):
        backward(i)
    comm.flush()


@torch.no_grad()
def pipelined_forward(model, groups, micro_ids: list[torch.Tensor],
                      head_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> list:
    """Forward-only pipeline: stage ``s`` starts micro-batch ``i+1`` as soon as it has
    sent ``i`` on, so stages overlap. Returns ``head_fn(output, i)`` per micro-batch on
    the last stage, an empty list elsewhere."""
    hidden = model.config.hidden_size
    param = next(model.parameters())
    comm = P2P(param.device)
    results = []
    for i, ids in enumerate(micro_ids):
        x = token_ids(ids) if groups.is_first else comm.recv(
            _hidden_shape(ids, hidden), model.activation_dtype, groups.prev,
            groups.link(groups.prev, 0, grad=False))
        out = model(x, **forward_kwargs(ids))
        if groups.is_last:
            results.append(head_fn(out, i))
        else:
            comm.send(out, groups.next, groups.link(groups.next, 0, grad=False))
    comm.flush()
    return results
