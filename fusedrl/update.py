"""The PPO update, written once: the mini-batch schedule, the micro-batch losses and the
loop over mini-batches. Every update path -- one device, 1F1B pipelines on Ray
workers, the fused actor/critic schedule -- runs :func:`run_update` and differs only in
``forward_backward`` (how the micro-batches of one mini-batch flow through the models)
and in what a :class:`Trainable` does to reduce gradients (nothing on one device; a
data-parallel all-reduce and a model-parallel norm on workers).

Losses (:data:`LOSSES`) read a model output already computed (by a module, or by the
last stage of a pipeline), so the numbers are the same whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from fusedrl.algorithms import ppo
from fusedrl.models.llama import gather_logits
from fusedrl.rollout import RolloutBatch, response_logprobs_from, response_values_from


def minibatch_schedule(n: int, ppo_cfg, seed: int, iteration: int) -> list[list[torch.Tensor]]:
    """Per mini-batch (``ppo_epochs`` passes over a shuffle of ``n`` samples), its
    micro-batches' row indices. Drawn on a CPU generator seeded by ``(seed,
    iteration)``: the same shuffle on every device and every runtime, and a resumed run
    repeats it."""
    gen = torch.Generator().manual_seed(seed * 7919 + iteration)
    out = []
    for _ in range(ppo_cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, ppo_cfg.mini_batch_size):
            mini = perm[start:start + ppo_cfg.mini_batch_size]
            out.append([mini[k:k + ppo_cfg.micro_batch_size]
                        for k in range(0, len(mini), ppo_cfg.micro_batch_size)])
    return out


def actor_loss(out: torch.Tensor, mb: RolloutBatch, idx: torch.Tensor, targets: dict,
               tp_group, config, temperature: float):
    """Clipped policy loss (Schulman et al. 2017, eq. 7; DAPO's clip-higher with
    ``actor.clip_ratio_low/high``) aggregated by ``actor.loss_agg_mode``, plus the KL
    loss term (GRPO, ``actor.use_kl_loss``), minus the entropy bonus, of one micro-batch
    (rows ``idx`` of the iteration's batch), and its stats."""
    p, a = config.ppo, config.actor
    r = mb.response_mask.shape[1]
    logp = response_logprobs_from(out, mb, tp_group, temperature)
    pg, stats = ppo.policy_loss(logp, targets["old_logp"][idx, :r],
                                targets["advantages"][idx, :r], mb.response_mask,
                                p.clip_ratio, clip_ratio_low=a.clip_ratio_low,
                                clip_ratio_high=a.clip_ratio_high,
                                loss_agg_mode=a.loss_agg_mode)
    loss = pg
    if a.use_kl_loss:
        kl, kl_stats = ppo.kl_loss(logp, targets["ref_logp"][idx, :r], mb.response_mask,
                                   a.kl_loss_type, a.loss_agg_mode)
        loss = loss + a.kl_loss_coef * kl
        stats.update(kl_stats)
    if p.entropy_coef:
        logits = gather_logits(out, tp_group)
        pidx = mb.predictor_index()
        picked = logits.gather(1, pidx[..., None].expand(-1, -1, logits.shape[-1]))
        ent = ppo.agg_loss(ppo.entropy_from_logits(picked.float() / temperature),
                           mb.response_mask, a.loss_agg_mode)
        loss = loss - p.entropy_coef * ent
        stats["entropy"] = float(ent)
    return loss, {f"actor/{k}": v for k, v in stats.items()}


def critic_loss(out: torch.Tensor, mb: RolloutBatch, idx: torch.Tensor, targets: dict,
                tp_group, config, temperature: float):
    """Clipped value loss of one micro-batch, and its stats."""
    r = mb.response_mask.shape[1]
    v = response_values_from(out, mb)
    vf, stats = ppo.value_loss(v, targets["values"][idx, :r], targets["returns"][idx, :r],
                               mb.response_mask, config.ppo.value_clip)
    return vf, {"critic/vf_loss": stats["vf_loss"], "critic/vf_clipfrac": stats["clipfrac"]}


AGG_MODE = {"actor": lambda config: config.actor.loss_agg_mode,
            "critic": lambda config: "token-mean"}
"""How each model's loss aggregates tokens (the critic's: every token once)."""


LOSSES = {"actor": actor_loss, "critic": critic_loss}
"""Trained model name -> its micro-batch loss."""

MicroLoss = Callable[[str, torch.Tensor, RolloutBatch, torch.Tensor, int], torch.Tensor]
"""``loss(model_name, output, micro_batch, rows, k) -> scalar to differentiate`` (already
weighted by the micro-batch's share of the mini-batch, so that the accumulated gradient
is the whole mini-batch's); ``k`` is the micro-batch's index in its mini-batch."""


class Trainable(Protocol):
    """One trained model (or this worker's shard of it) with its optimizer.

    Per mini-batch: :meth:`zero_grad`, the micro-batches' backwards, then
    :meth:`reduce_grads` (data-parallel all-reduce on workers),
    :meth:`clip_grad_norm` (global norm over all shards) and :meth:`step`.
    """

    tp_group: object

    def zero_grad(self) -> None: ...

    def reduce_grads(self) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    def step(self) -> None: ...


def run_update(schedule: list[list[torch.Tensor]], models: dict[str, Trainable],
               forward_backward: Callable[[int, list[torch.Tensor], MicroLoss], None],
               targets: dict, config, temperature: float) -> dict[str, dict]:
    """PPO epochs of ``models`` (``actor``/``critic``) over ``schedule``; returns per
    model ``{"micro": [(mini, k, stats)], "grad_norm": [...]}`` of the micro-batches
    this process computed a loss for.

    Gradient accumulation: micro-batch ``k``'s loss is weighted by its share of the
    mini-batch's tokens (or responses, per the loss aggregation mode;
    :func:`fusedrl.algorithms.ppo.micro_batch_weights`), from the whole mini-batch's
    masks (``targets["response_mask"]``), so every process and layout weighs alike and
    the accumulated loss is the mini-batch's."""
    out = {name: {"micro": [], "grad_norm": []} for name in models}
    mask = targets["response_mask"]
    for m, micros in enumerate(schedule):
        for tm in models.values():
            tm.zero_grad()
        weights = {name: ppo.micro_batch_weights([mask[idx] for idx in micros],
                                                 AGG_MODE[name](config))
                   for name in models}

        def loss(name, output, mb, idx, k, m=m, weights=weights):
            value, stats = LOSSES[name](output, mb, idx, targets, models[name].tp_group,
                                        config, temperature)
            out[name]["micro"].append((m, k, stats))
            return value * weights[name][k]

        forward_backward(m, micros, loss)
        for name, tm in models.items():
            tm.reduce_grads()
            out[name]["grad_norm"].append(tm.clip_grad_norm(config.ppo.grad_clip))
            tm.step()
    return out


def merge_update_stats(results: dict[str, list[dict | None]]) -> dict[str, float]:
    """Iteration metrics from :func:`run_update`'s results (per model, one per reporting
    process; None where a process reported nothing): each stat averaged over the
    micro-batches in schedule order, ``{model}/grad_norm`` averaged over mini-batches."""
    stats: dict[str, list[float]] = {}
    for name, outs in results.items():
        outs = [o for o in outs if o]
        for _, _, st in sorted(((m, k, st) for o in outs for m, k, st in o["micro"]),
                               key=lambda x: (x[0], x[1])):
            for key, v in st.items():
                stats.setdefault(key, []).append(v)
        stats[f"{name}/grad_norm"] = outs[0]["grad_norm"]
    return {k: sum(v) / len(v) for k, v in stats.items()}
