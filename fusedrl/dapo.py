"""DAPO's dynamic sampling and overlong penalty in the iteration (Yu et al. 2025, §3.2 and
§3.4; verl's ``algorithm.filter_groups`` and ``reward.overlong_buffer``).

Dynamic sampling: a group whose responses all score the same (all right, all wrong)
has zero group-relative advantage and gives no policy gradient, so it only dilutes
the batch. The iteration drops such groups (:func:`fusedrl.algorithms.ppo.
dynamic_sampling_mask`) and generates more prompts, round after round, until
``ppo.rollout_batch_size`` groups are kept or ``max_num_gen_batches`` rounds ran; then
it trains on the first ``rollout_batch_size`` kept groups. Unlike verl, which raises
when the cap is reached, it trains on the groups it kept (``filter_groups/short`` 1),
or, if none, on the last round as generated, so a run never stops on a hard batch.
Every round runs the rollout in full (generation and inference): the rule reward that
decides the filter needs the finished responses, and the inference of dropped groups
is the price of leaving the rollout stages untouched.

Overlong penalty: :func:`fusedrl.algorithms.ppo.overlong_penalty` of each response's
length, added to its score before the filter and the advantages, as verl does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from fusedrl.algorithms import ppo
from fusedrl.rollout import RolloutBatch

EXTRA_ROUND_IDS = 1 << 36
"""Sample ids of the extra rounds start here (training's ids are below, validation's
from 2^40): every sample keeps its own random stream."""


def overlong_scores(scores: torch.Tensor, batch: RolloutBatch, config) -> tuple:
    """``(scores + penalty, penalty)`` with the configured overlong buffer (a zero
    penalty when off)."""
    ob = config.reward.overlong_buffer
    if not ob.enable:
        return scores, torch.zeros_like(scores)
    pen = ppo.overlong_penalty(batch.response_lens.cpu(), config.generation.max_new_tokens,
                               ob.len, ob.penalty_factor).to(scores)
    return scores + pen, pen


def _pad(x: torch.Tensor, width: int, value=0) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def concat_parts(parts: list[dict], pad_id: int) -> dict:
    """Rows of several rounds as one: each part ``{"batch", "old_logp", "ref_logp",
    "values" (or None), "scores", "prompts"}``, tensors right-padded to the widest."""
    width = max(p["batch"].input_ids.shape[1] for p in parts)
    rmax = max(p["batch"].response_mask.shape[1] for p in parts)
    b = [p["batch"] for p in parts]
    batch = RolloutBatch(
        torch.cat([_pad(x.input_ids, width, pad_id) for x in b]),
        torch.cat([x.prompt_lens for x in b]), torch.cat([x.response_lens for x in b]),
        torch.cat([_pad(x.response_mask, rmax) for x in b]),
        torch.cat([_pad(x.gen_logprobs, rmax) for x in b]),
        torch.cat([x.sample_ids for x in b]))
    out = {"batch": batch, "prompts": [i for p in parts for i in p["prompts"]],
           "scores": torch.cat([p["scores"] for p in parts])}
    for k in ("old_logp", "ref_logp", "values"):
        out[k] = None if parts[0][k] is None else torch.cat([_pad(p[k], rmax) for p in parts])
    return out


def select_rows(part: dict, rows: torch.Tensor, n: int) -> dict:
    """The rows ``rows`` (whole groups of ``n``) of a part, padding trimmed."""
    batch = part["batch"].select(rows)
    rmax = batch.response_mask.shape[1]
    out = {"batch": batch, "scores": part["scores"][rows],
           "prompts": [part["prompts"][int(r) // n] for r in rows[::n]]}
    for k in ("old_logp", "ref_logp", "values"):
        out[k] = None if part[k] is None else part[k][rows, :rmax]
    return out


def extra_requests(trainer, iteration: int, round_: int) -> tuple[list, list[int]]:
    """Requests and dataset rows of extra round ``round_`` (>= 1) of ``iteration``: the
    data stream's prompts after every iteration's own (positions from 2^30 on, one
    block per iteration and round), sample ids from :data:`EXTRA_ROUND_IDS`."""
    c = trainer.config
    b, cap = c.ppo.rollout_batch_size, c.algorithm.filter_groups.max_num_gen_batches
    first = (1 << 30) + (iteration * cap + round_) * b
    rows = trainer.stream_rows(range(first, first + b))
    reqs = trainer.requests(iteration, rows)
    base = EXTRA_ROUND_IDS + (iteration * cap + round_) * len(reqs)
    return [replace(r, sample_id=base + j) for j, r in enumerate(reqs)], rows


def scored_part(trainer, out, prompts: list[int]) -> dict:
    """A round's rollout output on the trainer's device, scored (rule or model reward,
    plus the overlong penalty)."""
    s, c, dev = trainer.setup, trainer.config, trainer.device
    batch = out.batch if out.batch.input_ids.device == dev else out.batch.to(dev)
    n = c.actor.rollout_n
    scores = out.scores if out.scores is not None else \
        trainer.rule_scores(batch, [s.prompts[i] for i in prompts for _ in range(n)])
    scores, pen = overlong_scores(scores.to(dev), batch, c)
    return {"batch": batch, "old_logp": out.old_logp.to(dev), "ref_logp": out.ref_logp.to(dev),
            "values": out.values.to(dev) if out.values is not None else None,
            "scores": scores, "prompts": list(prompts), "overlong": pen}


def dynamic_sampling(trainer, iteration: int, first: dict) -> tuple[dict, dict]:
    """DAPO's filter over rounds, from the iteration's own round ``first``:
    ``(kept part, metrics)``."""
    c = trainer.config
    n, want = c.actor.rollout_n, c.ppo.rollout_batch_size
    cap = c.algorithm.filter_groups.max_num_gen_batches
    kept: list[dict] = []
    have = dropped = rounds = 0
    part = first
    while True:
        rounds += 1
        index = torch.arange(len(part["prompts"]), device=part["scores"].device
                             ).repeat_interleave(n)
        keep = ppo.dynamic_sampling_mask(part["scores"], index)
        groups = keep.view(-1, n)[:, 0]
        dropped += int((~groups).sum())
        if bool(groups.any()):
            kept.append(select_rows(part, keep.nonzero().squeeze(1), n))
            have += int(groups.sum())
        if have >= want or rounds >= cap:
            break
        reqs, prompts = extra_requests(trainer, iteration, rounds)
        out = trainer.stages.rollout.run(reqs, trainer.sampling_params())
        part = scored_part(trainer, out, prompts)
    metrics = {"filter_groups/num_gen_batches": rounds, "filter_groups/groups_dropped": dropped,
               "filter_groups/groups_kept": min(have, want), "filter_groups/short": int(have < want)}
    if not kept:  # nothing but equal-score groups within the cap: the last round as is
        return part, metrics
    pad = trainer.setup.tokenizer.pad_token_id
    merged = concat_parts(kept, pad) if len(kept) > 1 else kept[0]
    if have > want:  # the first rollout_batch_size kept groups
        merged = select_rows(merged, torch.arange(want * n, device=merged["scores"].device), n)
    return merged, metrics


def apply(trainer, iteration: int, batch, old_logp, ref_logp, values, scores, prompts):
    """The iteration's rollout after DAPO's options (each off unless configured):
    ``(batch, old_logp, ref_logp, values, scores, prompts, metrics)``. Dynamic sampling
    runs only without partial rollouts (their batches close on their own schedule)."""
    c = trainer.config
    scores, pen = overlong_scores(scores, batch, c)
    part = {"batch": batch, "old_logp": old_logp, "ref_logp": ref_logp, "values": values,
            "scores": scores, "prompts": list(prompts)}
    metrics = {}
    if c.algorithm.filter_groups.enable and trainer.partial is None:
        part, metrics = dynamic_sampling(trainer, iteration, part)
    if c.reward.overlong_buffer.enable:
        _, pen = overlong_scores(torch.zeros_like(part["scores"]), part["batch"], c)
        metrics["reward/overlong_penalty/mean"] = float(pen.mean())
    return (part["batch"], part["old_logp"], part["ref_logp"], part["values"], part["scores"],
            part["prompts"], metrics)
