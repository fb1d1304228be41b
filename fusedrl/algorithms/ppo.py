"""PPO building blocks: masked statistics, KL penalties, losses, KL controllers.

Tensors are ``[B, T]`` over response tokens with a ``mask`` (1 = response token,
0 = padding). Padded positions never contribute to a loss, a statistic or a
gradient, even when they hold garbage such as ``-inf`` log-probs.

**Loss aggregation** (``loss_agg_mode``, verl's names, :func:`agg_loss`). By default a
loss is a *token mean over the micro-batch* (``"token-mean"``): long responses weigh
more than short ones (DAPO, Yu et al. 2025, §3.3). ``"seq-mean-token-mean"`` averages
each response's token mean (GRPO's 1/|o_i|, Shao et al. 2024 eq. 3);
``"seq-mean-token-sum"`` averages each response's token sum (Dr. GRPO, Liu et al. 2025
§3.1, up to their constant normaliser, which Adam does not see). With gradient
accumulation, weighting each micro-batch loss by :func:`micro_batch_weights` makes the
accumulated loss equal to the whole mini-batch's in every mode (``1/num_micro`` does
only for equal counts).

Also here: DAPO clip-higher (``clip_ratio_low``/``clip_ratio_high`` of
:func:`policy_loss`), KL as a loss term (:func:`kl_loss`, GRPO), DAPO's overlong
penalty (:func:`overlong_penalty`) and dynamic-sampling filter
(:func:`dynamic_sampling_mask`).

Names follow verl (``ppo_kl``, ``clipfrac``, ``low_var_kl``) so metrics line up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedrl.algorithms.groups import group_ids

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "KL_KINDS",
    "last_token_index",
    "token_level_rewards",
    "LOSS_AGG_MODES",
    "agg_loss",
    "loss_agg_count",
    "micro_batch_weights",
    "policy_loss",
    "kl_loss",
    "value_loss",
    "overlong_penalty",
    "equal_reward_groups",
    "dynamic_sampling_mask",
    "entropy_from_logits",
    "AdaptiveKLController",
    "FixedKLController",
]


# ----------------------------------------------------------------------------- masked statistics


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate half-precision inputs in float32 (a bf16 token count is inexact)."""
    return torch.promote_types(x.dtype, torch.float32)


def _fill(x: torch.Tensor, valid: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """``x`` with invalid positions replaced by ``value``; their gradient is exactly 0
    (``torch.where`` does not multiply the upstream gradient by anything, so a
    non-finite entry at a padded position cannot turn gradients into NaN)."""
    return torch.where(valid, x, torch.full((), value, dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x * mask``; positions with ``mask == 0`` are skipped even if non-finite."""
    xm = _fill(x.to(_acc_dtype(x)), mask != 0) * mask
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all elements if ``None``).

    Half-precision inputs are accumulated and returned in float32. An all-zero mask
    gives 0 (not NaN), so an empty micro-batch adds nothing.
    """
    denom = (mask.sum() if dim is None else mask.sum(dim)).to(_acc_dtype(x))
    return masked_sum(x, mask, dim) / denom.clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of ``x``; Bessel-corrected when ``unbiased``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = float(mask.sum())
        if n < 2:
            raise ValueError(
                f"masked_var: need at least 2 valid entries for an unbiased variance, got {n:g}"
            )
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Advantage whitening: ``(x - mean) / sqrt(var + 1e-8)`` over the valid entries.

    Statistics are over the whole batch (all valid tokens), as in OpenAI baselines'
    PPO2 and verl. With ``shift_mean=False`` the mean is added back (scale only).
    Padded positions are returned as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return _fill(out, mask != 0)


# ----------------------------------------------------------------------------- KL and rewards

KL_KINDS = ("k1", "abs", "mse", "low_var_kl")
_KL_ALIASES = {"kl": "k1", "k2": "mse", "k3": "low_var_kl"}


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the sampled tokens' log-probs.

    With ``log r = logprob - ref_logprob`` (Schulman, "Approximating KL divergence", 2020):

    * ``"k1"`` (alias ``"kl"``): ``log r``, unbiased, high variance;
    * ``"abs"``: ``|log r|``;
    * ``"mse"`` (alias ``"k2"``): ``0.5 * (log r)^2``;
    * ``"low_var_kl"`` (alias ``"k3"``): ``exp(-log r) - 1 + log r`` = ``(ratio - 1) - log ratio``
      with ``ratio = pi_ref / pi``: unbiased and >= 0; as in verl, ``log ratio`` is clamped to
      [-20, 20] and the result to [-10, 10] for stability.
    """
    kind = _KL_ALIASES.get(kind, kind)
    log_r = logprob - ref_logprob
    if kind == "k1":
        return log_r
    if kind == "abs":
        return log_r.abs()
    if kind == "mse":
        return 0.5 * log_r.square()
    if kind == "low_var_kl":
        log_ratio = (-log_r).clamp(-20.0, 20.0)  # log(pi_ref / pi)
        return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(
        f"kl_penalty: unknown kind {kind!r}, expected one of {KL_KINDS} (or kl, k2, k3)"
    )


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each right-padded row (-1 for an empty row)."""
    return mask.ne(0).sum(dim=-1) - 1


def token_level_rewards(
    score: torch.Tensor,
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> torch.Tensor:
    """KL-penalised per-token reward (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019).

    ``R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``, spread over tokens::

        reward_t = -kl_coef * kl_t            for every valid token t
        reward_t += score                     at the last valid token

    Args:
        score: ``[B]`` sequence-level reward (reward model or rule).
        logprob, ref_logprob: ``[B, T]`` log-probs of the sampled tokens under the
            policy that generated them and under the reference model.
        mask: ``[B, T]`` right-padded response mask.
        kl_coef: ``beta``.
        kl_kind: estimator, see :func:`kl_penalty`.

    Returns:
        ``[B, T]`` rewards, 0 on padding. Rows with no valid token get no score.
    """
    if score.dim() != 1 or score.shape[0] != mask.shape[0]:
        raise ValueError(
            f"token_level_rewards: score must be [B={mask.shape[0]}], got {tuple(score.shape)}"
        )
    valid = mask != 0
    kl = kl_penalty(_fill(logprob, valid), _fill(ref_logprob, valid), kl_kind)
    rewards = _fill(-kl_coef * kl, valid)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    is_last = positions == last_token_index(mask).unsqueeze(-1)  # no match for empty rows
    # A rule reward's scores are computed on CPU; the rewards live with the log-probs.
    score = score.to(device=rewards.device, dtype=rewards.dtype)
    return rewards + is_last.to(rewards.dtype) * score.unsqueeze(-1)


# ----------------------------------------------------------------------------- aggregation

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
"""``loss_agg_mode`` values, as verl names them."""


def _check_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode {mode!r}: expected one of {', '.join(LOSS_AGG_MODES)}")


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor,
             loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (verl ``agg_loss``)::

        token-mean            sum_{i,t} L_it / sum_i |o_i|
        seq-mean-token-sum    1/S * sum_i sum_t L_it
        seq-mean-token-mean   1/S * sum_i (1/|o_i|) sum_t L_it

    over valid tokens, ``S`` the number of responses with at least one valid token (an
    empty response adds nothing). An all-empty batch gives 0.
    """
    _check_agg_mode(loss_agg_mode)
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, mask)
    seq = masked_sum(loss_mat, mask, dim=-1)  # [B] token sums
    n_tok = mask.ne(0).sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq = seq / n_tok.clamp(min=1).to(seq.dtype)
    return masked_mean(seq, n_tok > 0)


def loss_agg_count(mask: torch.Tensor, loss_agg_mode: str = "token-mean") -> int:
    """What :func:`agg_loss` divides by: valid tokens (``token-mean``) or non-empty
    responses (``seq-mean-*``)."""
    _check_agg_mode(loss_agg_mode)
    valid = mask.ne(0)
    if loss_agg_mode == "token-mean":
        return int(valid.sum())
    return int(valid.any(-1).sum())


def micro_batch_weights(masks: Sequence[torch.Tensor], loss_agg_mode: str = "token-mean",
                        total: int | None = None) -> list[float]:
    """Weight of each micro-batch's :func:`agg_loss` so that ``sum_k w_k * loss_k`` equals
    the loss of the micro-batches concatenated (one mini-batch)::

        w_k = count_k / total,   count = loss_agg_count(mask_k), total = sum_k count_k

    since each mode is a sum over tokens or responses divided by such a count. With data
    parallelism pass ``total``, the count over every rank's micro-batches of the
    mini-batch (an all-reduce of the local sum); if gradients are then averaged over
    ``dp`` ranks, multiply the weights by ``dp``. A mini-batch with nothing to average
    (``total == 0``, every loss is 0) gets ``1/len(masks)`` each.
    """
    counts = [loss_agg_count(m, loss_agg_mode) for m in masks]
    total = sum(counts) if total is None else int(total)
    if total < sum(counts):
        raise ValueError(f"micro_batch_weights: total={total} is below the micro-batches' own "
                         f"count {sum(counts)}")
    if total == 0:
        return [1.0 / len(masks)] * len(masks) if masks else []
    return [c / total for c in counts]


# ----------------------------------------------------------------------------- losses


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float = 0.2,
    *,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    behav_logprob: torch.Tensor | None = None,
    behav_weight_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate objective (Schulman et al. 2017, PPO eq. 7), as a loss::

        ratio_t = exp(logprob_t - old_logprob_t)
        L_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))
        loss    = agg_loss(L, mask, loss_agg_mode)       (token-mean by default)

    ``eps_low``/``eps_high`` are ``clip_ratio_low``/``clip_ratio_high``, each
    ``clip_ratio`` when not given; a larger ``eps_high`` is DAPO's clip-higher (Yu et al.
    2025, eq. 10, §3.1: low-probability tokens may grow, against entropy collapse).
    ``logprob - old_logprob`` is clamped to [-20, 20] before ``exp`` (as verl does)
    so a stale token cannot overflow the ratio.

    Off-policy tokens (partial rollouts, :mod:`fusedrl.partial`): with ``behav_logprob``,
    the log-probs of the policy that sampled each token (recorded at generation time),
    the loss is AReaL's decoupled PPO objective (Fu et al. 2025, arXiv 2505.24298 §5.1,
    eq. 5; Hilton et al. 2022): the ratio is clipped around the proximal policy
    ``old_logprob`` (the current weights before the update) and each token's term is
    weighted by the behaviour importance weight ``w_t = exp(old_logprob_t -
    behav_logprob_t)`` (no gradient)::

        L_t = w_t * max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))

    Tokens with ``w_t > behav_weight_cap`` (when > 0) leave the loss (AReaL's
    ``behav_imp_weight_cap``). Where ``behav_logprob == old_logprob`` (tokens sampled by
    the current weights) ``w_t = 1`` and the loss is PPO's.

    Returns:
        ``(loss, stats)`` with stats ``pg_loss``; ``ppo_kl``, the token mean of
        ``old_logprob - logprob`` (k1 estimate of KL(old || new)); ``clipfrac``, the
        fraction of valid tokens whose clipped term is the larger one (gradient 0).
    """
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    if not (low > 0 and high > 0):
        raise ValueError(f"policy_loss: clip ratios must be > 0, got clip_ratio_low={low}, "
                         f"clip_ratio_high={high}")
    valid = mask != 0
    log_ratio = _fill(logprob - old_logprob, valid).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    advantages = _fill(advantages, valid)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    extra = {}
    if behav_logprob is not None:
        with torch.no_grad():
            weight = _fill(old_logprob - behav_logprob, valid).clamp(-20.0, 20.0).exp()
            if behav_weight_cap > 0:
                kept = (weight <= behav_weight_cap).to(mask.dtype)
                extra["behav_capped_frac"] = float(masked_mean(1.0 - kept, mask))
                mask = mask * kept
            extra["behav_weight_mean"] = float(masked_mean(weight, mask))
        per_token = per_token * weight
    loss = agg_loss(per_token, mask, loss_agg_mode)
    with torch.no_grad():
        ppo_kl = masked_mean(-log_ratio, mask)
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    stats = {"pg_loss": float(loss.detach()), "ppo_kl": float(ppo_kl), "clipfrac": float(clipfrac),
             **extra}
    return loss, stats


def kl_loss(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    mask: torch.Tensor,
    kl_loss_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL to the reference as a loss term instead of a reward penalty (GRPO, Shao et al.
    2024, eq. 3-4: ``J = ... - beta * D_KL[pi || pi_ref]`` with the k3 estimator
    ``pi_ref/pi - log(pi_ref/pi) - 1``; verl ``use_kl_loss``)::

        loss = agg_loss(kl_penalty(logprob, ref_logprob, kl_loss_type), mask, loss_agg_mode)

    ``kl_loss_type``: ``k1``, ``k2``, ``k3`` (= ``low_var_kl``, verl's default), ``abs``,
    ``mse``, see :func:`kl_penalty`. The caller adds ``kl_loss_coef * loss`` to the policy
    loss. Padded positions (any value) add nothing. Returns ``(loss, {"kl_loss": ...})``.
    """
    valid = mask != 0
    kl = kl_penalty(_fill(logprob, valid), _fill(ref_logprob.detach(), valid), kl_loss_type)
    loss = agg_loss(kl, mask, loss_agg_mode)
    return loss, {"kl_loss": float(loss.detach())}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    *,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (OpenAI baselines PPO2, verl ``compute_value_loss``)::

        v_clip = old_values + clip(values - old_values, -c, c)
        loss   = 0.5 * agg_loss(max((values - R)^2, (v_clip - R)^2), mask, loss_agg_mode)

    Returns:
        ``(loss, stats)`` with stats ``vf_loss`` and ``clipfrac`` (fraction of valid
        tokens where the clipped error is the larger one).
    """
    valid = mask != 0
    values, old_values, returns = (_fill(x, valid) for x in (values, old_values, returns))
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err_unclipped = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    loss = 0.5 * agg_loss(torch.maximum(err_unclipped, err_clipped), mask, loss_agg_mode)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err_unclipped).float(), mask)
    return loss, {"vf_loss": float(loss.detach()), "clipfrac": float(clipfrac)}


# ----------------------------------------------------------------------------- DAPO sampling


def overlong_penalty(lengths: torch.Tensor | Sequence[int], max_length: int,
                     buffer_length: int, penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13, §3.4), added to the score::

        R_length(y) = 0                                    if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                    = -1                                   if |y| > L_max

    times ``penalty_factor`` (verl ``overlong_buffer.penalty_factor``), with ``L_max =
    max_length`` and ``L_cache = buffer_length``. ``lengths`` are response lengths in
    tokens; returns float32 ``[B]`` in ``[-penalty_factor, 0]``.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"overlong_penalty: need 0 < buffer_length <= max_length, got "
                         f"buffer_length={buffer_length}, max_length={max_length}")
    lengths = torch.as_tensor(lengths).to(torch.float32)
    expected = max_length - buffer_length
    ramp = ((expected - lengths) / buffer_length).clamp(max=0.0)
    ramp = torch.where(lengths > max_length, torch.full_like(ramp, -1.0), ramp)
    return ramp * penalty_factor


def _group_extremes(scores: torch.Tensor, index) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    gid, n = group_ids(index, scores.device)
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    hi = torch.full((n,), -torch.inf, dtype=scores.dtype, device=scores.device)
    lo = torch.full((n,), torch.inf, dtype=scores.dtype, device=scores.device)
    hi = hi.scatter_reduce(0, gid, scores, "amax")
    lo = lo.scatter_reduce(0, gid, scores, "amin")
    size = torch.zeros(n, dtype=torch.long, device=gid.device).index_add_(0, gid,
                                                                        torch.ones_like(gid))
    return gid, hi == lo, size


def equal_reward_groups(scores: torch.Tensor, index) -> list:
    """Prompt ids (values of ``index``, in first-appearance order) of the groups of at
    least two samples whose scores are all equal: all right or all wrong, so every
    group-relative advantage is 0 and the group gives no gradient (DAPO, eq. 11, §3.2)."""
    if len(index) != scores.shape[0]:
        raise ValueError(f"equal_reward_groups: index has {len(index)} entries for "
                         f"{scores.shape[0]} scores")
    gid, equal, size = _group_extremes(scores, index)
    keys = index.tolist() if hasattr(index, "tolist") else list(index)
    first = {}
    for k, g in zip(keys, gid.tolist()):
        first.setdefault(g, k)
    return [first[g] for g in range(len(first)) if bool(equal[g]) and int(size[g]) > 1]


def dynamic_sampling_mask(scores: torch.Tensor, index) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, eq. 11, §3.2: keep groups with
    ``0 < |{correct}| < G``): ``[B]`` bool, True for the samples to keep, False for those
    of :func:`equal_reward_groups`. The caller refills the batch with new prompts until it
    has enough kept groups. As verl does, a group of one sample is kept (it has no
    within-group spread to test)."""
    if len(index) != scores.shape[0]:
        raise ValueError(f"dynamic_sampling_mask: index has {len(index)} entries for "
                         f"{scores.shape[0]} scores")
    gid, equal, size = _group_extremes(scores, index)
    return ~(equal & (size > 1))[gid]

# ----------------------------------------------------------------------------- entropy


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logsumexp(z) - sum(p * z)``.

    Stable for large logits (no ``log`` of a probability) and for ``-inf`` logits of
    masked-out tokens (``0 * -inf`` would be NaN, so those enter the sum as 0, with
    gradient 0). ``[..., V] -> [...]``.
    """
    p = torch.softmax(logits, dim=-1)
    finite = torch.where(
        torch.isneginf(logits), torch.zeros((), dtype=logits.dtype, device=logits.device), logits
    )
    return torch.logsumexp(logits, dim=-1) - (p * finite).sum(dim=-1)


# ----------------------------------------------------------------------------- KL controllers


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences", §2.2)::

        e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta  <- beta * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``value`` is the current coefficient; call :meth:`update` once per iteration with
    the measured KL and the number of samples (episodes) it was measured on.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController: target_kl and horizon must be > 0, "
                f"got {target_kl}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient; :meth:`update` is a no-op (same interface as adaptive)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """The coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
