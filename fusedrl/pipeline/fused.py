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

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from fusedrl.devices import timer
from fusedrl.packing import forward_kwargs, token_ids
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


class _Inbox:
    """The node's receives, posted ahead of need (``irecv``) and waited for when a task
    needs its input.

    A blocking ``recv`` at the start of a task puts the transfer (and, on gloo, the
    round trip that tells the sender where to write) on the critical path. The task
    list fixes, per channel (pipeline, direction), which messages arrive and in which
    order, so up to ``depth`` receives per channel are posted in that order, each as
    soon as the one ``depth`` before it is consumed: the transfer overlaps the tasks
    before it. Posting order per channel is the consumption order, so NCCL (which
    matches a group's operations in posting order) pairs them with the sender's
    ``isend`` s as before; on gloo the tags pair them too. Nothing here blocks but
    :meth:`take`, and it waits only for a message an earlier task sends, so the
    no-deadlock argument of the module doc holds unchanged.
    """

    def __init__(self, device: torch.device, depth: int = 2):
        self.device, self.depth = device, depth
        self.queued: dict[tuple[int, bool], list] = {}  # channel -> messages not yet posted
        self.posted: dict[tuple[int, bool], list] = {}  # channel -> posted (key, work, tensor)

    def expect(self, channel: tuple[int, bool], key: int, shape, dtype, src: int, group, tag: int):
        self.queued.setdefault(channel, []).append((key, tuple(shape), dtype, src, group, tag))

    def start(self) -> None:
        for channel, msgs in self.queued.items():
            msgs.reverse()  # pop() from the end = the next message in order
            self.posted[channel] = []
            for _ in range(self.depth):
                self._post(channel)

    def _post(self, channel) -> None:
        msgs = self.queued[channel]
        if msgs:
            key, shape, dtype, src, group, tag = msgs.pop()
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self.posted[channel].append((key, dist.irecv(t, src, group=group, tag=tag), t))

    def take(self, channel, key: int) -> torch.Tensor:
        posted = self.posted[channel]
        got, work, t = posted.pop(0)
        if got != key:  # check_node_tasks-valid lists never get here
            raise ValueError(f"channel {channel}: expected message {key}, the schedule consumes {got}")
        work.wait()
        self._post(channel)
        return t


def train_fused(runs: Sequence[FusedPipeline], tasks: Sequence[Task],
                on_task: Callable[[Task, float, float], None] | None = None,
                prefetch: int = 2) -> dict[str, float]:
    """Run this node's ``tasks`` (forward/backward of pipeline ``runs[t.pipeline]``'s
    micro-batch ``t.microbatch`` through this worker's stage ``t.stage``) in order,
    accumulating each model's gradients. ``on_task(task, start, end)`` (wall-clock
    seconds) after each task, ``start`` once its input has arrived: the device
    timeline's events, whose gaps are the waits for other stages. ``prefetch``:
    receives posted ahead per channel (:class:`_Inbox`; 0: a blocking ``recv`` at the
    start of each task, as 1F1B does).

    Returns ``{"wait_s", "compute_s", "tasks"}``: seconds blocked on receives and in
    the tasks themselves (forward/backward and posting sends)."""
    if not runs:
        raise ValueError("train_fused needs at least one pipeline")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    device = next(runs[0].model.parameters()).device
    link = P2P(device)
    n = len(runs)
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    last_backward = {}
    info = []
    for run in runs:
        info.append((run.model.config.hidden_size, run.model.activation_dtype))
    inbox = _Inbox(device, prefetch) if prefetch else None
    for k, t in enumerate(tasks):
        run = runs[t.pipeline]
        g = run.groups
        if g.coord.pp != t.stage:
            raise ValueError(f"task {t} is for stage {t.stage}, this worker holds stage "
                             f"{g.coord.pp} of pipeline {t.pipeline}")
        if t.kind not in ("F", "B"):
            raise ValueError(f"task kind must be 'F' or 'B', got {t.kind!r}")
        if t.kind == "B":
            last_backward[t.pipeline] = k
        ids = run.micro_ids[t.microbatch]
        shape = (ids.shape[0], ids.shape[1], info[t.pipeline][0])
        grad = t.kind == "B"
        if inbox is not None and not (g.is_first if not grad else g.is_last):
            peer = g.next if grad else g.prev
            inbox.expect((t.pipeline, grad), t.microbatch, shape, info[t.pipeline][1], peer,
                         g.link(peer, t.pipeline, grad=grad),
                         message_tag(t.pipeline, t.microbatch, grad, n))
    if inbox is not None:
        inbox.start()

    def receive(t: Task, grad: bool, shape, dtype, peer, g) -> torch.Tensor:
        if inbox is not None:
            return inbox.take((t.pipeline, grad), t.microbatch)
        return link.recv(shape, dtype, peer, g.link(peer, t.pipeline, grad=grad),
                         message_tag(t.pipeline, t.microbatch, grad, n))

    wait = compute = 0.0
    for k, t in enumerate(tasks):
        t_wait = time.time()
        run = runs[t.pipeline]
        g = run.groups
        key = (t.pipeline, t.microbatch)
        hidden, dtype = info[t.pipeline]
        if t.kind == "F":
            ids = run.micro_ids[t.microbatch]
            if g.is_first:
                x = token_ids(ids)
            else:
                x = receive(t, False, (ids.shape[0], ids.shape[1], hidden), dtype, g.prev, g)
                x.requires_grad_(True)
            t_start = time.time()
            out = run.model(x, **forward_kwargs(ids))
            if g.is_last:
                out = run.loss_fn(out, t.microbatch)
            else:
                link.send(out, g.next, g.link(g.next, t.pipeline, grad=False),
                          message_tag(t.pipeline, t.microbatch, False, n))
            inputs[key], outputs[key] = x, out
        else:
            if k == last_backward[t.pipeline] and run.before_last_backward is not None:
                run.before_last_backward()
            x, out = inputs.pop(key), outputs.pop(key)
            if g.is_last:
                t_start = time.time()
                out.backward()
            else:
                dy = receive(t, True, out.shape, out.dtype, g.next, g)
                t_start = time.time()
                out.backward(dy)
            if not g.is_first:
                link.send(x.grad, g.prev, g.link(g.prev, t.pipeline, grad=True),
                          message_tag(t.pipeline, t.microbatch, True, n))
        t_end = time.time()
        wait += t_start - t_wait
        compute += t_end - t_start
        if on_task is not None:
            on_task(t, t_start, t_end)
    if inputs:
        raise ValueError(f"micro-batches forwarded but never backwarded: {sorted(inputs)}")
    link.flush()
    return {"wait_s": wait, "compute_s": compute, "tasks": float(len(tasks))}


def profile_stage(model: torch.nn.Module, groups, ids, repeats: int = 8,
                  statistic: str = "min") -> tuple[float, float, float]:
    """Time one micro-batch (token ids, or packed rows :class:`fusedrl.packing.Packed`,
    as the training runs them) through this stage: ``(fwd_s, bwd_s,
    activation_bytes)``.

    Runs ``1 + repeats`` forward/backward passes on ``ids`` (one warm-up; the fastest
    of the rest, the least disturbed by other processes on a shared machine: with 4, a
    loaded 2-core machine gave one stage 4-10x its time and a schedule built for the
    wrong bottleneck, bench/fused_train.py) with this
    stage alone: a later stage gets random hidden states of the
    right shape, an intermediate stage random output gradients, the last stage a
    log-softmax loss over its output (the cost of the PPO losses' log-probs). Memory
    is the bytes of the tensors autograd saves for backward, parameters excluded
    (RLHFuse's per-micro-batch activation memory,
    :class:`fusedrl.runtime.memory.SavedActivations`). Timers synchronise the device
    first (CUDA kernels are asynchronous). The random inputs are drawn on the CPU and
    moved to the model's device. The model's gradients are cleared afterwards. Runs no
    collective beyond the model's own (tp), so every tp rank of a stage must call it
    together. ``statistic="median"`` reports the median pass instead of the fastest
    (bench/fused_train.py's contention measurement, where the typical pass counts).
    """
    from fusedrl.runtime.memory import SavedActivations

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    pick = min if statistic == "min" else statistics.median
    params = list(model.parameters())
    dtype, dev = model.activation_dtype, params[0].device
    gen = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    fwd, bwd, mem = [], [], 0
    for r in range(1 + repeats):
        if groups.is_first:
            x = token_ids(ids)
        else:
            x = torch.randn(ids.shape[0], ids.shape[1], hidden, generator=gen,
                            dtype=torch.float32).to(dev, dtype).requires_grad_(True)
        t0 = timer(dev)
        with SavedActivations(model) as saved:
            out = model(x, **forward_kwargs(ids))
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
    return pick(fwd), pick(bwd), float(mem)
