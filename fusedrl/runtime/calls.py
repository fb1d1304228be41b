"""What the last pipeline stage computes from a model's output, per micro-batch: the
PPO losses and the inference results. Written on top of :mod:`fusedrl.rollout` and
:mod:`fusedrl.algorithms.ppo` exactly as the single-device trainer uses them, so the
numbers are the same whatever the layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.algorithms import ppo
from fusedrl.models.llama import gather_logits
from fusedrl.rollout import RolloutBatch, response_logprobs, response_values, sequence_scores


class Output:
    """A model output already computed (by the pipeline), with the model's call interface,
    so the rollout helpers apply to it unchanged."""

    def __init__(self, out: torch.Tensor, tp_group):
        self.out = out
        self.tp_group = tp_group

    def __call__(self, _input_ids) -> torch.Tensor:
        return self.out


def infer_head(kind: str, out: torch.Tensor, mb: RolloutBatch, tp_group, width: int,
               temperature: float) -> torch.Tensor:
    """``logp`` / ``values`` padded to ``width`` response tokens (float32), or ``score``."""
    o = Output(out, tp_group)
    if kind == "score":
        return sequence_scores(o, mb).float()
    x = response_logprobs(o, mb, temperature) if kind == "logp" else response_values(o, mb)
    return F.pad(x.float(), (0, width - x.shape[1]))


def actor_loss(out, mb: RolloutBatch, idx, data: dict, tp_group, ppo_cfg, temperature: float):
    """PPO clipped policy loss (minus the entropy bonus) of one micro-batch, and its stats."""
    r = mb.response_mask.shape[1]
    logp = response_logprobs(Output(out, tp_group), mb, temperature)
    pg, stats = ppo.policy_loss(logp, data["old_logp"][idx, :r], data["advantages"][idx, :r],
                                mb.response_mask, ppo_cfg.clip_ratio)
    loss = pg
    if ppo_cfg.entropy_coef:
        logits = gather_logits(out, tp_group)
        pidx = mb.predictor_index()
        picked = logits.gather(1, pidx[..., None].expand(-1, -1, logits.shape[-1]))
        ent = ppo.masked_mean(ppo.entropy_from_logits(picked.float() / temperature),
                              mb.response_mask)
        loss = loss - ppo_cfg.entropy_coef * ent
        stats["entropy"] = float(ent)
    return loss, {f"actor/{k}": v for k, v in stats.items()}


def critic_loss(out, mb: RolloutBatch, idx, data: dict, tp_group, ppo_cfg, temperature: float):
    """Clipped value loss of one micro-batch, and its stats."""
    r = mb.response_mask.shape[1]
    v = response_values(Output(out, tp_group), mb)
    vf, stats = ppo.value_loss(v, data["values"][idx, :r], data["returns"][idx, :r],
                               mb.response_mask, ppo_cfg.value_clip)
    return vf, {"critic/vf_loss": stats["vf_loss"], "critic/vf_clipfrac": stats["clipfrac"]}


LOSSES = {"actor": actor_loss, "critic": critic_loss}
