"""PPO algorithm pieces: losses, KL control, advantages (see :mod:`fusedrl.kernels.gae`)
and reward functions."""

from fusedrl.algorithms.ppo import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    kl_penalty,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    token_level_rewards,
    value_loss,
)
from fusedrl.algorithms.rewards import BUILTIN_REWARDS, RewardFn, arithmetic_reward, load_reward_fn

__all__ = [
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "kl_penalty",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_level_rewards",
    "value_loss",
    "BUILTIN_REWARDS",
    "RewardFn",
    "arithmetic_reward",
    "load_reward_fn",
]
