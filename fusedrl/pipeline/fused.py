"""Fused execution of several training pipelines sharing devices (RLHFuse §5, Chimera).

Each worker holds one stage of each pipeline (the actor's stage ``s`` and the critic's
stage placed on the same devices, e.g. reversed) and runs its node's task list from
the fused schedule (:mod:`fusedrl.pipeline.fused_plan`): forward or backward of one
micro-batch through one stage, in the scheduler's order. Activations go downstream and
activation gradients upstream by point-to-point messages, exactly as in
:func:`fusedrl.pipeline.schedule.train_1f1b`; only the interleaving differs, so each
model's gradient is the sum of the same per-micro-batch gradients, accumulated in the
same micro-batch order when the schedule is FIFO per stage (the scheduler's are).

**Messages.** Every message is an ``isend`` and a blocking ``recv`` of a tensor whose
shape both sides know (``[B, T, hidden]`` of the micro-batch, whose token ids every
stage holds), tagged with ``(pipeline, micro-batch, direction)``. On one link (ordered
pair of devices) the actor's activations and the critic's gradients (or the reverse)
travel together. Each (pipeline, direction) has its own channel group
(:meth:`~fusedrl.runtime.groups.PlacementGroups.link`): NCCL ignores tags and runs a
group's operations in posting order, and on one channel both ends post in micro-batch
order (the scheduler's schedules are FIFO per stage). On gloo the tag also makes each
``recv`` match its own message whichever order the two sides post them in.

**Why it cannot deadlock.** A valid schedule is a timed one: every task starts after
the task on its node before it, and after the task whose output it receives (forward
``s - 1`` / backward ``s + 1`` of its micro-batch) ends. Suppose some worker waited
forever, and take the unfinished task with the earliest start time. Everything before
it on its node started earlier, so finished, so the worker reached it; the task it
receives from started earlier too, so it ran and posted its ``isend`` (which never
blocks), so the ``recv`` completes — a contradiction. Sends never wait for receivers,
and receives only wait for messages from earlier tasks: a cycle of waits is impossible.
:func:`~fusedrl.pipeline.fused_plan.check_node_tasks` rejects task lists that are not
this node's tasks (each forward before its backward) before anything is sent.

Lifecycle (per mini-batch, on every device of the fused placement)::

    runs = [FusedPipeline(actor_model, actor_groups, actor_ids, actor_loss),
            FusedPipeline(critic_model, critic_groups, critic_ids, critic_loss)]
    train_fused(runs, tasks_of_this_node)        # gradients accumulated in each model

and, once per shape, :func:`profile_stage` on every stage to build the problem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fusedrl.devices import timer
from fusedrl.pipeline.fused_plan import Task
from fusedrl.pipeline.p2p import P2P

TAG_BASE = 1 << 10
"""Fused messages use tags from here on (plain 1F1B / generation use tag 0)."""


def message_tag(pipeline: int, microbatch: int, grad: bool, pipelines: int = 2) -> int:
    """Distinct per (pipeline, micro-batch, direction): one message per tag and link."""
    return TAG_BASE + (microbatch * 2 + int(grad)) * pipelines + pipeline


@dataclass
class FusedPipeline:
    """This worker's stage of one pipeline, and the micro-batches it trains on.

    ``loss_fn(output, i)`` runs on the last stage and returns the scalar to
    differentiate for micro-batch ``i`` (already scaled); ``before_last_backward`` is
    called before this stage's last backward of the step (to arm overlapped gradient
    reduction)."""

    model: torch.nn.Module
    groups: object  # fusedrl.runtime.groups.PlacementGroups
    micro_ids: Sequence[torch.Tensor]
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor]
    before_last_backward: Callable[[], None] | None = None


def train_fused(runs: Sequence[FusedPipeline], tasks: Sequence[Task],
                on_task: Callable[[Task, float, float], None] | None = None) -> None:
    """Run this node's ``tasks`` (forward/backward of pipeline ``runs[t.pipeline]``'s
    micro-batch ``t.microbatch`` through this worker's stage ``t.stage``) in order,
    accumulating each model's gradients. ``on_task(task, start, end)`` (wall-clock
    seconds) after each task: the device timeline's events."""
    if not runs:
        raise ValueError("train_fused needs at least one pipeline")
    link = P2P(next(runs[0].model.parameters()).device)
    n = len(runs)
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    last_backward = {}
    for k, t in enumerate(tasks):
        if t.kind == "B":
            last_backward[t.pipeline] = k
    info = []
    for run in runs:
        info.append((run.model.config.hidden_size, next(run.model.parameters()).dtype))

    for k, t in enumerate(tasks):
        t_start = time.time()
        run = runs[t.pipeline]
        g = run.groups
        if g.coord.pp != t.stage:
            raise ValueError(f"task {t} is for stage {t.stage}, this worker holds stage "
                             f"{g.coord.pp} of pipeline {t.pipeline}")
        key = (t.pipeline, t.microbatch)
        hidden, dtype = info[t.pipeline]
        if t.kind == "F":
            ids = run.micro_ids[t.microbatch]
            if g.is_first:
                x = ids
            else:
                x = link.recv((ids.shape[0], ids.shape[1], hidden), dtype, g.prev,
                              g.link(g.prev, t.pipeline, grad=False),
                              message_tag(t.pipeline, t.microbatch, False, n))
                x.requires_grad_(True)
            out = run.model(x)
            if g.is_last:
                out = run.loss_fn(out, t.microbatch)
            else:
                link.send(out, g.next, g.link(g.next, t.pipeline, grad=False),
                          message_tag(t.pipeline, t.microbatch, False, n))
            inputs[key], outputs[key] = x, out
        elif t.kind == "B":
            if k == last_backward[t.pipeline] and run.before_last_backward is not None:
                run.before_last_backward()
            x, out = inputs.pop(key), outputs.pop(key)
            if g.is_last:
                out.backward()
            else:
                grad = link.recv(out.shape, out.dtype, g.next,
                                 g.link(g.next, t.pipeline, grad=True),
                                 message_tag(t.pipeline, t.microbatch, True, n))
                out.backward(grad)
            if not g.is_first:
                link.send(x.grad, g.prev, g.link(g.prev, t.pipeline, grad=True),
                          message_tag(t.pipeline, t.microbatch, True, n))
        else:
            raise ValueError(f"task kind must be 'F' or 'B', got {t.kind!r}")
        if on_task is not None:
            on_task(t, t_start, time.time())
    if inputs:
        raise ValueError(f"micro-batches forwarded but never backwarded: {sorted(inputs)}")
    link.flush()


def profile_stage(model: torch.nn.Module, groups, ids: torch.Tensor,
                  repeats: int = 4) -> tuple[float, float, float]:
    """Time one micro-batch through this stage: ``(fwd_s, bwd_s, activation_bytes)``.

    Runs ``1 + repeats`` forward/backward passes on ``ids`` (one warm-up; the fastest
    of the rest, the least disturbed by other processes on a shared machine) with this
    stage alone: a later stage gets random hidden states of the
    right shape, an intermediate stage random output gradients, the last stage a
    log-softmax loss over its output (the cost of the PPO losses' log-probs). Memory
    is the bytes of the tensors autograd saves for backward, parameters excluded
    (RLHFuse's per-micro-batch activation memory,
    :class:`fusedrl.runtime.memory.SavedActivations`). Timers synchronise the device
    first (CUDA kernels are asynchronous). The random inputs are drawn on the CPU and
    moved to the model's device. The model's gradients are cleared afterwards. Runs no
    collective beyond the model's own (tp), so every tp rank of a stage must call it
    together.
    """
    from fusedrl.runtime.memory import SavedActivations

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    params = list(model.parameters())
    dtype, dev = params[0].dtype, params[0].device
    gen = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    fwd, bwd, mem = [], [], 0
    for r in range(1 + repeats):
        if groups.is_first:
            x = ids
        else:
            x = torch.randn(ids.shape[0], ids.shape[1], hidden, generator=gen,
                            dtype=torch.float32).to(dev, dtype).requires_grad_(True)
        t0 = timer(dev)
        with SavedActivations(model) as saved:
            out = model(x)
            if groups.is_last:
                out = out.float().log_softmax(-1).mean()
        t1 = timer(dev)
        nbytes = saved.nbytes  # before backward frees the saved tensors
        if groups.is_last:
            out.backward()
        else:
            out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float32)
                         .to(dev, out.dtype))
        t2 = timer(dev)
        if r > 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            mem = max(mem, nbytes)
    for p in params:
        p.grad = None
    return min(fwd), min(bwd), float(mem)
