"""Advantage estimators as a registry, with verl's names and definitions so a verl
config's ``algorithm.adv_estimator`` carries over.

An estimator maps a right-padded batch of ``B`` responses to ``(advantages, returns)``::

    fn(token_level_rewards [B, T], response_mask [B, T], index [B], **options)

``index`` is the prompt id of each sample (the ``rollout_n`` responses to a prompt share
one, see :mod:`fusedrl.algorithms.groups`). The iteration passes the same keyword
options to every estimator (``values``, ``gamma``, ``lam``, ``norm_adv_by_std_in_grpo``,
``whiten``); each uses those it needs and ignores the rest. Outputs are float32
(float64 for float64 rewards), 0 on padding.

Register your own with :func:`register_adv_estimator`; a config names it either by
its registered name (when the module is imported anyway) or as ``"module:NAME"`` /
``"path/file.py:NAME"``, which imports the module (running its decorator) first.
``needs_critic`` says whether the estimator reads critic values: a run whose estimator
needs none builds no critic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusedrl.algorithms.groups import group_ids, group_mean, group_sizes, group_std
from fusedrl.algorithms.ppo import masked_sum, masked_whiten

__all__ = [
    "register_adv_estimator",
    "get_adv_estimator",
    "available_adv_estimators",
    "compute_gae_advantage",
    "compute_grpo_advantage",
    "compute_rloo_advantage",
    "compute_reinforce_plus_plus_advantage",
    "compute_reinforce_plus_plus_baseline_advantage",
]

AdvEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]

_REGISTRY: dict[str, AdvEstimator] = {}


def register_adv_estimator(name: str, *, needs_critic: bool = False):
    """Decorator registering ``fn`` as the advantage estimator ``name``.

    Sets ``fn.needs_critic``. Registering a different function under a taken name is an
    error; re-running the same definition (a module imported again) replaces it.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_adv_estimator: name must be a non-empty string without "
                         f"':', got {name!r}")

    def decorate(fn: AdvEstimator) -> AdvEstimator:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__,
                                                                      fn.__qualname__):
            raise ValueError(f"adv estimator {name!r} is already registered "
                             f"({old.__module__}.{old.__qualname__})")
        fn.needs_critic = bool(needs_critic)
        fn.adv_estimator_name = name
        _REGISTRY[name] = fn
        return fn

    return decorate


def available_adv_estimators() -> list[str]:
    """Registered estimator names, sorted."""
    return sorted(_REGISTRY)


def get_adv_estimator(name: str) -> AdvEstimator:
    """The estimator registered as ``name``; ``"module:NAME"`` or ``"file.py:NAME"``
    imports the module first (its :func:`register_adv_estimator` registers ``NAME``)."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and ":" in name:
        from fusedrl.algorithms.rewards import _import_module

        module_path, _, key = name.rpartition(":")
        if not module_path or not key:
            raise ValueError(f"adv estimator {name!r} is not of the form 'module:NAME'")
        _import_module(module_path, name, what="adv estimator")
        if key in _REGISTRY:
            return _REGISTRY[key]
        raise ValueError(f"adv estimator {name!r}: importing {module_path!r} registered no "
                         f"estimator {key!r} (registered: {', '.join(available_adv_estimators())})")
    raise ValueError(f"unknown adv estimator {name!r}; registered: "
                     f"{', '.join(available_adv_estimators())} (or 'module:NAME')")


# ----------------------------------------------------------------------------- helpers


def _check(name: str, rewards: torch.Tensor, mask: torch.Tensor, index) -> None:
    if rewards.dim() != 2 or mask.shape != rewards.shape:
        raise ValueError(f"adv estimator {name}: token_level_rewards and response_mask must be "
                         f"[B, T] of one shape, got {tuple(rewards.shape)} and "
                         f"{tuple(mask.shape)}")
    if index is not None and len(index) != rewards.shape[0]:
        raise ValueError(f"adv estimator {name}: index has {len(index)} entries for a batch of "
                         f"{rewards.shape[0]}")


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def _scores(name: str, rewards: torch.Tensor, mask: torch.Tensor, index) -> torch.Tensor:
    """Sequence score: the sum of the token rewards over the response (verl's outcome
    estimators), ``[B]``; ``index`` is required (groups)."""
    _check(name, rewards, mask, index)
    if index is None:
        raise ValueError(f"adv estimator {name}: needs index (the prompt id of each sample)")
    return masked_sum(_float(rewards), mask, dim=-1)


def _spread(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]``: the value on every response token, 0 on padding."""
    out = per_sample.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


# ----------------------------------------------------------------------------- estimators


@register_adv_estimator("gae", needs_critic=True)
@torch.no_grad()
def compute_gae_advantage(token_level_rewards, response_mask, index=None, *, values=None,
                          gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, **_):
    """GAE (Schulman et al. 2016, eq. 11-16; :func:`fusedrl.kernels.gae.compute_gae`):
    ``A_t = sum_l (gamma*lam)^l delta_{t+l}``, ``delta_t = r_t + gamma V_{t+1} - V_t``,
    returns ``A_t + V_t``; advantages whitened over the batch when ``whiten`` (verl
    always whitens; ``ppo.whiten_advantages`` keeps the choice)."""
    from fusedrl.kernels.gae import compute_gae

    _check("gae", token_level_rewards, response_mask, index)
    if values is None:
        raise ValueError("adv estimator gae: needs values (a critic)")
    advantages, returns = compute_gae(token_level_rewards, values, response_mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns


@register_adv_estimator("grpo")
@torch.no_grad()
def compute_grpo_advantage(token_level_rewards, response_mask, index, *,
                           norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6, **_):
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath §4.1.2; verl
    ``compute_grpo_outcome_advantage``): with ``s_i`` the sum of sample i's rewards,
    ``A_i = (s_i - mean(group)) / (std(group) + eps)`` on every response token, std
    unbiased, ``eps = 1e-6``; a group of one sample has mean 0 and std 1.
    ``norm_adv_by_std_in_grpo=False`` drops the division: Dr. GRPO (Liu et al. 2025,
    "Understanding R1-Zero-Like Training", §3.1) ``A_i = s_i - mean(group)``.
    Returns ``(A, A)``."""
    scores = _scores("grpo", token_level_rewards, response_mask, index)
    gid, n_groups = group_ids(index, scores.device)
    single = group_sizes(gid, n_groups) == 1
    mean = torch.where(single, torch.zeros_like(scores), group_mean(scores, gid, n_groups))
    adv = scores - mean
    if norm_adv_by_std_in_grpo:
        std = torch.where(single, torch.ones_like(scores), group_std(scores, gid, n_groups))
        adv = adv / (std + epsilon)
    adv = _spread(adv, response_mask)
    return adv, adv.clone()


@register_adv_estimator("rloo")
@torch.no_grad()
def compute_rloo_advantage(token_level_rewards, response_mask, index, **_):
    """RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019): each sample's
    baseline is the mean score of the *other* samples of its group,
    ``A_i = s_i - 1/(n-1) sum_{j != i} s_j = n/(n-1) * (s_i - mean(group))``
    (verl ``compute_rloo_outcome_advantage``); a group of one keeps ``A_i = s_i``.
    Returns ``(A, A)``."""
    scores = _scores("rloo", token_level_rewards, response_mask, index)
    gid, n_groups = group_ids(index, scores.device)
    n = group_sizes(gid, n_groups).to(scores.dtype)
    loo = (scores - group_mean(scores, gid, n_groups)) * n / (n - 1).clamp(min=1)
    adv = _spread(torch.where(n > 1, loo, scores), response_mask)
    return adv, adv.clone()


@register_adv_estimator("reinforce_plus_plus")
@torch.no_grad()
def compute_reinforce_plus_plus_advantage(token_level_rewards, response_mask, index=None, *,
                                          gamma: float = 1.0, **_):
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, §2; verl
    ``compute_reinforce_plus_plus_outcome_advantage``): discounted token returns
    ``G_t = sum_{k>=t} gamma^(k-t) r_k`` over the response (they stop at its end), then
    whitened over all valid tokens of the batch: ``A = (G - mean) / sqrt(var + 1e-8)``.
    Returns ``(A, G)``."""
    from fusedrl.kernels.gae import compute_gae

    _check("reinforce_plus_plus", token_level_rewards, response_mask, index)
    rewards = _float(token_level_rewards)
    # GAE with V = 0 and lam = 1 is exactly the discounted return: delta_t = r_t.
    returns, _unused = compute_gae(rewards, torch.zeros_like(rewards), response_mask, gamma, 1.0)
    return masked_whiten(returns, response_mask), returns


@register_adv_estimator("reinforce_plus_plus_baseline")
@torch.no_grad()
def compute_reinforce_plus_plus_baseline_advantage(token_level_rewards, response_mask, index,
                                                   **_):
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262, §2 "with baseline"; verl
    ``compute_reinforce_plus_plus_baseline_outcome_advantage``): the group mean score is
    subtracted (0 for a group of one), the result put on every response token and whitened
    over all valid tokens of the batch. Returns ``(A, A)``."""
    scores = _scores("reinforce_plus_plus_baseline", token_level_rewards, response_mask, index)
    gid, n_groups = group_ids(index, scores.device)
    single = group_sizes(gid, n_groups) == 1
    mean = torch.where(single, torch.zeros_like(scores), group_mean(scores, gid, n_groups))
    adv = masked_whiten(_spread(scores - mean, response_mask), response_mask)
    return adv, adv.clone()
