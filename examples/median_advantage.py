"""A custom advantage estimator: each response's score minus the median score of the
responses to the same prompt (a group baseline that one outlier cannot move, unlike
GRPO's mean), on every response token. Critic-free.

    fusedrl train --plugin examples/median_advantage.py \
        --set algorithm.adv_estimator=group_median --set actor.rollout_n=4

An estimator maps the batch's token rewards ``[B, T]``, the response mask ``[B, T]`` and
``index`` (the prompt id of each sample; ``actor.rollout_n`` samples share one) to
``(advantages, returns)``, both ``[B, T]``; keyword options it does not use (``values``,
``gamma``, ``lam``, ...) land in ``**_``. ``needs_critic=False``: the run builds, places
and checkpoints no critic.
"""

import torch

from fusedrl.algorithms.advantages import register_adv_estimator
from fusedrl.algorithms.groups import group_ids


@register_adv_estimator("group_median", needs_critic=False)
@torch.no_grad()
def group_median_advantage(token_level_rewards, response_mask, index, **_):
    mask = response_mask.to(token_level_rewards.dtype)
    scores = (token_level_rewards * mask).sum(-1)
    gid, n_groups = group_ids(index, scores.device)
    adv = torch.empty_like(scores)
    for g in range(n_groups):
        members = gid == g
        adv[members] = scores[members] - scores[members].median()
    per_token = adv.unsqueeze(-1) * mask
    return per_token, per_token
