"""PPO pieces against values computed by hand on small fixed tensors.

Every batch carries a padded position filled with garbage (-inf, NaN, 1e9): it must
change neither the value nor the gradients, which are 0 there.
"""

import math

import pytest
import torch

from fusedrl.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_level_rewards,
    value_loss,
)

INF = float("inf")
NAN = float("nan")


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, NAN, INF]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), (1 + 2 + 3) / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty micro-batch: 0, not NaN
    assert masked_mean(x.bfloat16(), mask).dtype == torch.float32


def test_masked_whiten_hand_computed():
    # valid [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3,
    # std 1.2909944 -> [-1.161895, -0.387298, 0.387298, 1.161895]; padding -> 0.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(masked_whiten(x, mask), [[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]])
    close(
        masked_whiten(x, mask, shift_mean=False),
        [[1.338105, 2.112702, 2.887298], [3.661895, 0.0, 0.0]],
    )
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


# ----------------------------------------------------------------------------- KL and rewards


@pytest.mark.parametrize(
    "kind,pos,neg",
    [
        # log r = logprob - ref = +0.5 (pos) and -0.5 (neg)
        ("k1", 0.5, -0.5),
        ("kl", 0.5, -0.5),
        ("abs", 0.5, 0.5),
        ("mse", 0.125, 0.125),  # 0.5 * 0.5^2
        # (ratio - 1) - log ratio with log ratio = ref - logprob:
        # pos: e^-0.5 + 0.5 - 1 = 0.1065307;  neg: e^0.5 - 0.5 - 1 = 0.1487213
        ("low_var_kl", 0.1065307, 0.1487213),
        ("k3", 0.1065307, 0.1487213),
    ],
)
def test_kl_penalty(kind, pos, neg):
    logprob = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.5])
    close(kl_penalty(logprob, ref, kind), [pos, neg])


def test_kl_penalty_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'k9'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k9")


def test_low_var_kl_is_clamped():
    # log ratio = ref - logprob = 100 -> clamped to 20, e^20 - 21 -> clamped to 10.
    close(kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]), "low_var_kl"), [10.0])


def test_token_level_rewards_hand_computed():
    # kl_coef 0.1, k1: reward_t = -0.1 * (logprob - ref), plus the score at the last valid token.
    logprob = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -INF, NAN], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5, -1.2], [-1.3, 0.0, 0.0], [-9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    score = torch.tensor([1.0, -0.5, 2.0])
    rewards = token_level_rewards(score, logprob, ref, mask, kl_coef=0.1)
    close(
        rewards,
        [
            [-0.05, 0.05, -0.02 + 1.0],  # log r = 0.5, -0.5, 0.2
            [-0.03 - 0.5, 0.0, 0.0],  # log r = 0.3; one token: kl and score together
            [0.0, 0.0, 0.0],  # empty response: no token to carry the score
        ],
    )
    with pytest.raises(ValueError, match="score must be"):
        token_level_rewards(score[:2], logprob, ref, mask, kl_coef=0.1)


# ----------------------------------------------------------------------------- policy loss


def _policy_batch():
    # log ratios 0.1, 0.5, -0.5, 0.5 on 4 valid tokens, then a padded token with garbage.
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -INF]])
    new = torch.tensor([[-0.9, -0.5, -1.5], [-0.5, 7.0, -INF]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 1e9, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return new, old, adv, mask


def test_policy_loss_hand_computed():
    new, old, adv, mask = _policy_batch()
    loss, stats = policy_loss(new, old, adv, mask, clip_ratio=0.2)
    # token  ratio                 A    -A*ratio    -A*clip(ratio,0.8,1.2)  max        clipped
    # 0      e^0.1  = 1.1051709    1    -1.1051709  -1.1051709              -1.1051709  no
    # 1      e^0.5  = 1.6487213    2    -3.2974425  -2.4                    -2.4        yes
    # 2      e^-0.5 = 0.6065307   -1     0.6065307   0.8                     0.8        yes
    # 3      e^0.5  = 1.6487213   -1     1.6487213   1.2                     1.6487213  no
    # loss = (-1.1051709 - 2.4 + 0.8 + 1.6487213) / 4 = -0.2641124
    close(loss, -0.2641124)
    close(stats["pg_loss"], -0.2641124)
    close(stats["clipfrac"], 0.5)
    close(stats["ppo_kl"], -(0.1 + 0.5 - 0.5 + 0.5) / 4)  # mean(old - new)
    loss.backward()
    # d/dlogprob of -A*ratio is -A*ratio on unclipped tokens, 0 on clipped ones; / 4 tokens.
    close(new.grad, [[-1.1051709 / 4, 0.0, 0.0], [1.6487213 / 4, 0.0, 0.0]])


def test_policy_loss_on_policy_gradient_is_minus_advantage():
    # ratio = 1 everywhere: loss = -mean(A), d loss / d logprob = -A / n.
    lp = torch.tensor([[-0.3, -2.0, -1.1]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.5, 3.0]])
    loss, stats = policy_loss(lp, lp.detach(), adv, torch.ones(1, 3))
    close(loss, -(0.5 - 1.5 + 3.0) / 3)
    close(stats["clipfrac"], 0.0)
    loss.backward()
    close(lp.grad, [[-0.5 / 3, 1.5 / 3, -3.0 / 3]])


# ----------------------------------------------------------------------------- value loss


def test_value_loss_hand_computed():
    # clip_range 0.2.  token  v    v_old  R     v_clip  (v-R)^2  (v_clip-R)^2  max   clipped
    #                  0      1.0  0.9    1.5   1.0     0.25     0.25          0.25  no
    #                  1      2.0  1.0    1.0   1.2     1.0      0.04          1.0   no
    #                  2      2.0  1.0    3.0   1.2     1.0      3.24          3.24  yes
    #                  3      0.0  0.5    0.4   0.3     0.16     0.01          0.16  no
    # loss = 0.5 * (0.25 + 1.0 + 3.24 + 0.16) / 4 = 0.58125
    values = torch.tensor([[1.0, 2.0, 2.0, 0.0, NAN]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 1.0, 0.5, INF]])
    returns = torch.tensor([[1.5, 1.0, 3.0, 0.4, -1e9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss, 0.58125)
    close(stats["vf_loss"], 0.58125)
    close(stats["clipfrac"], 0.25)
    loss.backward()
    # d/dv of 0.5 * (v - R)^2 / 4 = (v - R) / 4 on unclipped tokens; 0 where v_clip wins
    # (clip saturated) and on padding.
    close(values.grad, [[-0.5 / 4, 1.0 / 4, 0.0, -0.4 / 4, 0.0]])


# ----------------------------------------------------------------------------- entropy


def test_entropy_hand_computed():
    # uniform over 4: ln 4 = 1.3862944; p = (0.25, 0.75): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -INF, -INF]])
    close(entropy_from_logits(logits), [1.3862944, 0.5623351])
    big = torch.tensor([[1000.0, 0.0], [50.0, 50.0]])
    close(entropy_from_logits(big), [0.0, math.log(2.0)], tol=1e-5)  # float32: lse(50, 50) - 50


def test_entropy_gradient_matches_definition():
    logits = torch.randn(
        3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True
    )
    entropy_from_logits(logits).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    p = torch.softmax(ref, -1)
    (-(p * torch.log(p)).sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad)


# ----------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    # Ziegler et al. 2019: e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon.
    ctl = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # e = clip(0.5) = 0.2 -> * 1.00512
    close(ctl.value, 0.100512, tol=1e-12)
    ctl.update(current_kl=3.0, n_steps=256)  # e = clip(-0.5) = -0.2 -> * 0.99488
    close(ctl.value, 0.09999737856, tol=1e-12)
    ctl.update(current_kl=6.6, n_steps=256)  # e = 0.1 (inside the clip) -> * 1.00256
    close(ctl.value, 0.09999737856 * 1.00256, tol=1e-12)
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(0.1, 0.0, 10000)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=256)
    assert ctl.value == 0.05


def test_entropy_gradient_with_masked_vocab_is_finite():
    logits = torch.tensor([[0.5, -INF, 1.0, -INF]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[0, [1, 3]] == 0).all()
