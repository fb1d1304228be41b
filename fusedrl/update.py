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
from fusedrl.packing import packed_tokens
from fusedrl.rollout import (RolloutBatch, response_logprobs_from, response_outputs,
                             response_values_from)


def micro_batches(rows: torch.Tensor, lengths: torch.Tensor, size: int,
                  tokens: int = 0, packed: bool = False) -> list[torch.Tensor]:
    """Split ``rows`` (indices into a batch whose sequence lengths are ``lengths``) into
    micro-batches: ``tokens == 0``, consecutive runs of ``size`` rows in their order;
    ``tokens > 0``, a token budget (verl's ``ppo_max_token_len_per_gpu``): rows sorted by
    length, longest first (a stable sort, so equal lengths keep their order), each
    micro-batch filled while the tokens its forward computes -- rows x its longest row,
    right-padded -- stay within ``tokens``; ``packed``: :func:`packed_micro_batches`.
    Grouping by length is what removes the padding of a long-tailed batch; a row longer
    than the budget goes alone. Equal lengths give the same micro-batches packed or not
    (one sample per row). ``tokens == -1``: ``size`` x the longest of ``lengths`` (the
    whole batch's), the most a micro-batch of ``size`` rows of this batch could take."""
    if tokens == -1:
        tokens = size * int(lengths.max()) if len(lengths) else 0
    if tokens <= 0:
        return [rows[k:k + size] for k in range(0, len(rows), size)]
    lens = lengths[rows].tolist()
    order = sorted(range(len(rows)), key=lambda i: -lens[i])
    if packed:
        groups = packed_micro_batches([lens[i] for i in order], tokens)
        picks = [[order[j] for j in g] for g in groups]
    else:
        picks, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * lens[cur[0]] > tokens:  # cur[0]: its longest
                picks.append(cur)
                cur = []
            cur.append(i)
        picks.append(cur)
    return [rows[torch.tensor(p, dtype=torch.long, device=rows.device)] for p in picks]


def packed_micro_batches(lens: list[int], tokens: int) -> list[list[int]]:
    """Packed micro-batches of samples of lengths ``lens`` (longest first): each is rows
    as wide as its first (longest) sample, costing rows x width <= ``tokens``. A sample
    goes into the first row of any micro-batch with room for it (first-fit decreasing
    over every micro-batch's rows, so the short tail fills the gaps the long samples
    left), else into a new row of the last micro-batch within the budget, else opens a
    new micro-batch. Each micro-batch's samples, in this order, laid out again by
    :func:`fusedrl.packing.pack_rows` (first-fit decreasing at its longest sample's
    width) give the same rows: its rows only ever received its own samples, first
    fit, in this order."""
    groups: list[tuple[int, list[int], list[int]]] = []  # (width, row fills, members)
    for i, n in enumerate(lens):
        spot = next(((g, r) for g, (w, fill, _) in enumerate(groups)
                     for r, f in enumerate(fill) if f + n <= w), None)
        if spot is not None:
            g, r = spot
            groups[g][1][r] += n
            groups[g][2].append(i)
        elif groups and (len(groups[-1][1]) + 1) * groups[-1][0] <= tokens:
            groups[-1][1].append(n)
            groups[-1][2].append(i)
        else:
            groups.append((n, [n], [i]))
    return [members for _, _, members in groups]


def padded_tokens(micros: list[torch.Tensor], lengths: torch.Tensor,
                  packed: bool = False) -> list[int]:
    """Tokens each micro-batch's forward computes: rows x its longest row right-padded,
    or its packed rows x its longest sample (:func:`fusedrl.packing.packed_tokens`)."""
    if packed:
        return [packed_tokens(lengths[idx].tolist()) for idx in micros]
    return [len(idx) * int(lengths[idx].max()) if len(idx) else 0 for idx in micros]


def pad_ratio(micros: list[torch.Tensor], lengths: torch.Tensor,
              packed: bool = False) -> float:
    """Computed tokens (:func:`padded_tokens`) / real tokens over ``micros`` (1.0: no
    padding)."""
    real = sum(int(lengths[idx].sum()) for idx in micros)
    return sum(padded_tokens(micros, lengths, packed)) / real if real else 1.0


def assign_dp(costs: list[int], dp: int) -> list[int]:
    """The dp rank of each micro-batch, balancing the ranks' summed ``costs`` (padded
    tokens): greedy longest-first (LPT), the costliest micro-batch to the least-loaded
    rank (ties: the lower rank), as RLHFuse balances mini-batches by length (Zhong et
    al. 2024, sec. 4). A pure function of ``costs``, so every rank computes the same
    assignment; equal costs give micro-batch ``k`` to rank ``k % dp``."""
    if dp < 1:
        raise ValueError(f"assign_dp: dp={dp} must be >= 1")
    owner, load = [0] * len(costs), [0] * dp
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        d = min(range(dp), key=lambda r: (load[r], r))
        owner[k], load[d] = d, load[d] + costs[k]
    return owner


def dp_micro_batches(micros: list[torch.Tensor], lengths: torch.Tensor,
                     dp: int, packed: bool = False) -> list[list[tuple[int, torch.Tensor]]]:
    """Per dp rank, its micro-batches ``(k, rows)`` in schedule order, assigned by
    :func:`assign_dp` on the tokens their forwards compute (:func:`padded_tokens`)."""
    lengths = lengths.cpu()
    owner = assign_dp(padded_tokens([idx.cpu() for idx in micros], lengths, packed), dp)
    ranks: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(dp)]
    for k, idx in enumerate(micros):
        ranks[owner[k]].append((k, idx))
    return ranks


def seq_lengths(batch: RolloutBatch) -> torch.Tensor:
    """[B] tokens of each row (prompt + response): what a forward over it computes."""
    return batch.prompt_lens + batch.response_lens


def inference_micro_batches(batch: RolloutBatch, ppo_cfg) -> list[torch.Tensor]:
    """The inference calls' micro-batches over ``batch`` (CPU row indices):
    ``ppo.micro_batch_size`` consecutive rows, or rows grouped by length within
    ``ppo.infer_micro_batch_tokens`` computed tokens, packed or padded
    (:func:`micro_batches`)."""
    return micro_batches(torch.arange(len(batch)), seq_lengths(batch).cpu(),
                         ppo_cfg.micro_batch_size, ppo_cfg.infer_micro_batch_tokens,
                         ppo_cfg.packed)


def streamed_micro_size(lengths: list[int], ppo_cfg) -> int:
    """How many of ``lengths`` (sequence lengths of finished samples, in finish order)
    the next streamed inference micro-batch takes (inter-stage fusion): up to
    ``ppo.micro_batch_size``, or with ``ppo.infer_micro_batch_tokens`` as many as keep
    the tokens its forward computes (packed or padded, :func:`padded_tokens`) within
    the budget -- at least one. The default budget (-1) is ``ppo.micro_batch_size`` x
    the longest of ``lengths``."""
    tokens = ppo_cfg.infer_micro_batch_tokens
    if tokens == -1 and lengths:
        tokens = ppo_cfg.micro_batch_size * max(lengths)
    if tokens <= 0:
        return min(ppo_cfg.micro_batch_size, len(lengths))

    def cost(lens: list[int]) -> int:
        return packed_tokens(lens) if ppo_cfg.packed else len(lens) * max(lens)

    n = min(1, len(lengths))
    while n < len(lengths) and cost(lengths[:n + 1]) <= tokens:
        n += 1
    return n


def minibatch_schedule(n: int, ppo_cfg, seed: int, iteration: int,
                       lengths: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """Per mini-batch (``ppo_epochs`` passes over a shuffle of ``n`` samples), its
    micro-batches' row indices (:func:`micro_batches`: ``ppo.micro_batch_size`` rows, or
    ``ppo.micro_batch_tokens`` padded tokens of rows grouped by ``lengths``). Drawn on
    a CPU generator seeded by ``(seed, iteration)``: the same shuffle on every device
    and every runtime, and a resumed run repeats it."""
    tokens = ppo_cfg.micro_batch_tokens
    if tokens > 0 and lengths is None:
        raise ValueError("minibatch_schedule: ppo.micro_batch_tokens needs the batch's lengths")
    lengths = lengths.cpu() if lengths is not None else torch.zeros(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed * 7919 + iteration)
    out = []
    for _ in range(ppo_cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, ppo_cfg.mini_batch_size):
            mini = perm[start:start + ppo_cfg.mini_batch_size]
            out.append(micro_batches(mini, lengths, ppo_cfg.micro_batch_size, tokens,
                                     ppo_cfg.packed))
    return out


def unpermute(parts: list[torch.Tensor], micros: list[torch.Tensor]) -> torch.Tensor:
    """Per-row results of micro-batches ``micros`` (together a permutation of the
    batch's rows), concatenated back into row order."""
    order = torch.cat([idx.cpu() for idx in micros])
    cat = torch.cat(parts)
    return cat[torch.argsort(order).to(cat.device)]


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
                                loss_agg_mode=a.loss_agg_mode,
                                # partial rollouts: tokens sampled by older weights
                                behav_logprob=targets["behav_logp"][idx, :r]
                                if "behav_logp" in targets else None,
                                behav_weight_cap=config.fusion.behav_weight_cap)
    loss = pg
    if a.use_kl_loss:
        kl, kl_stats = ppo.kl_loss(logp, targets["ref_logp"][idx, :r], mb.response_mask,
                                   a.kl_loss_type, a.loss_agg_mode)
        loss = loss + a.kl_loss_coef * kl
        stats.update(kl_stats)
    if p.entropy_coef:
        picked, spread = response_outputs(gather_logits(out, tp_group), mb)
        ent = ppo.agg_loss(spread(ppo.entropy_from_logits(picked.float() / temperature)),
                           mb.response_mask, a.loss_agg_mode)
        loss = loss - p.entropy_coef * ent
        stats["entropy"] = float(ent.detach())
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
    model ``{"micro": [(mini, k, stats, weight)], "grad_norm": [...]}`` of the
    micro-batches this process computed a loss for.

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
            out[name]["micro"].append((m, k, stats, weights[name][k]))
            return value * weights[name][k]

        forward_backward(m, micros, loss)
        for name, tm in models.items():
            tm.reduce_grads()
            out[name]["grad_norm"].append(tm.clip_grad_norm(config.ppo.grad_clip))
            tm.step()
    for tm in models.values():  # no gradients held through the next rollout
        tm.zero_grad()
    return out


def merge_update_stats(results: dict[str, list[dict | None]]) -> dict[str, float]:
    """Iteration metrics from :func:`run_update`'s results (per model, one per reporting
    process; None where a process reported nothing): per mini-batch, each stat summed
    over its micro-batches with their gradient-accumulation weights -- the
    mini-batch's own value (its loss, not a mean of micro-batch losses), whatever the
    micro-batches (sample counts, token budgets, packed) -- then averaged over
    mini-batches; ``{model}/grad_norm`` averaged over mini-batches."""
    per_mini: dict[str, dict[int, float]] = {}
    for name, outs in results.items():
        outs = [o for o in outs if o]
        for m, _, st, w in sorted((x for o in outs for x in o["micro"]),
                                  key=lambda x: (x[0], x[1])):
            for key, v in st.items():
                acc = per_mini.setdefault(key, {})
                acc[m] = acc.get(m, 0.0) + w * v
        per_mini[f"{name}/grad_norm"] = dict(enumerate(outs[0]["grad_norm"]))
    return {k: sum(v.values()) / len(v) for k, v in per_mini.items()}
