"""Pipelined generation: the engine runs on stage 0, the other stages serve it.

The :class:`~fusedrl.generation.GenerationEngine` runs unchanged on every tp rank of
stage 0 (in lockstep: the same requests, the same per-sample random streams, the same
gathered logits, hence the same tokens). Its model is a :class:`StageProxy`: a call
runs stage 0 on the token ids, sends the hidden states downstream together with the
positions, cache slots and selected rows, and receives the last stage's vocab-parallel
logits back (tokens go from the last stage back to the first, as in ReaLHF's pipelined
generation). Each later stage runs :func:`serve` until stage 0 sends ``stop``; it keeps
its own KV cache of its own layers, indexed by the same slots.

Each tp rank talks to the same tp rank of its neighbour stages, so with tp > 1 the
messages of one step travel in tp parallel chains.

Message (stage s -> s+1): header ``[cmd, B, T, has_select]`` (int64), positions
``[B, T]``, slots ``[B]``, select ``[B]`` if any, hidden ``[B, T, hidden]``. Reply
(last -> stage 0): logits ``[B, V/tp]`` (with select) or ``[B, T, V/tp]``.

The header stays on the CPU (over gloo, also on a GPU run: its numbers are read on the
host to size the next receives, which would otherwise synchronise the device); the rest
lives on the stage models' device (NCCL on GPU). Each backend delivers a pair's messages
in order, so the mix keeps the protocol's order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_FORWARD, _STOP = 1, 0


def _send(t: torch.Tensor, dst: int) -> None:
    # Blocking send keeps the protocol simple; a step's messages form one chain
    # (0 -> 1 -> ... -> last -> 0), so the receiver is always already waiting or about to.
    dist.send(t.contiguous(), dst)


def _recv(shape, dtype, src: int, device: torch.device | str = "cpu") -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    dist.recv(t, src)
    return t


def _send_step(dst, positions, slots, select, hidden) -> None:
    b, t = positions.shape
    _send(torch.tensor([_FORWARD, b, t, int(select is not None)]), dst)
    _send(positions, dst)
    _send(slots, dst)
    if select is not None:
        _send(select, dst)
    _send(hidden, dst)


class StageProxy:
    """The whole pipeline, seen from stage 0 as a model with the engine's interface."""

    def __init__(self, stage_model, groups):
        self.stage = stage_model
        self.groups = groups
        self.config = stage_model.config
        self.tp_group = stage_model.tp_group
        self._last = groups.placement.devices[groups.placement.layout.rank(
            groups.coord.dp, groups.coord.tp, groups.placement.layout.pp - 1)]
        self._vocab = self.config.vocab_size // groups.placement.layout.tp

    def parameters(self):
        return self.stage.parameters()

    def new_cache(self, num_slots: int, max_len: int):
        return self.stage.new_cache(num_slots, max_len)

    @torch.no_grad()
    def __call__(self, ids, positions, cache, select=None):
        hidden = self.stage(ids, positions, cache, select)
        _send_step(self.groups.next, positions, cache.slots, select, hidden)
        b, t = ids.shape
        shape = (b, self._vocab) if select is not None else (b, t, self._vocab)
        return _recv(shape, hidden.dtype, self._last, hidden.device)

    def stop(self) -> None:
        """Release the serving stages (call once the engine is done)."""
        _send(torch.tensor([_STOP, 0, 0, 0]), self.groups.next)


@torch.no_grad()
def serve(stage_model, groups, cache) -> int:
    """Run this (non-first) stage for stage 0's engine until it stops; returns the
    number of steps served."""
    param = next(stage_model.parameters())
    dtype, dev = stage_model.activation_dtype, param.device
    h = stage_model.config.hidden_size
    steps = 0
    while True:
        header = _recv((4,), torch.int64, groups.prev)
        if int(header[0]) == _STOP:
            if not groups.is_last:
                _send(header, groups.next)
            return steps
        b, t, has_select = (int(x) for x in header[1:])
        positions = _recv((b, t), torch.int64, groups.prev, dev)
        slots = _recv((b,), torch.int64, groups.prev, dev)
        select = _recv((b,), torch.int64, groups.prev, dev) if has_select else None
        hidden = _recv((b, t, h), dtype, groups.prev, dev)
        out = stage_model(hidden, positions, cache.bind(slots), select)
        if groups.is_last:
            _send(out, groups.stage0)
        else:
            _send_step(groups.next, positions, slots, select, out)
        steps += 1
