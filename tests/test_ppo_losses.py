"""PPO pieces against values computed by hand on small fixed tensors.

Every batch carries a padded position filled with garbage (-inf, NaN, 1e9): it must
change neither the value nor the gradients, which are 0 there.
"""

import math

import pytest
import torch

from fusedrl.algorithms import (
    LOSS_AGG_MODES,
    AdaptiveKLController,
    FixedKLController,
    agg_loss,
    dynamic_sampling_mask,
    entropy_from_logits,
    equal_reward_groups,
    kl_loss,
    kl_penalty,
    loss_agg_count,
    masked_mean,
    masked_whiten,
    micro_batch_weights,
    overlong_penalty,
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


# ----------------------------------------------------------------------------- loss options


def test_agg_loss_modes_hand_computed():
    # rows: [1, 2 | pad], [3 | pad pad], an empty row (ignored by every mode)
    loss = torch.tensor([[1.0, 2.0, NAN], [3.0, INF, 1e9], [NAN, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(agg_loss(loss, mask, "token-mean"), (1 + 2 + 3) / 3)
    close(agg_loss(loss, mask, "seq-mean-token-sum"), ((1 + 2) + 3) / 2)
    close(agg_loss(loss, mask, "seq-mean-token-mean"), ((1 + 2) / 2 + 3) / 2)
    assert [loss_agg_count(mask, m) for m in LOSS_AGG_MODES] == [3, 2, 2]
    close(agg_loss(loss, torch.zeros_like(mask), "seq-mean-token-mean"), 0.0)
    with pytest.raises(ValueError, match="loss_agg_mode 'token-sum'"):
        agg_loss(loss, mask, "token-sum")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_weights_make_accumulation_equal_the_mini_batch(mode):
    # Mini-batch of 5 rows with 2, 1, 0, 3, 4 valid tokens, in micro-batches [0:3], [3:5]:
    # 3 tokens / 2 non-empty rows, then 7 tokens / 2 rows.
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    parts = [slice(0, 3), slice(3, 5)]
    weights = micro_batch_weights([mask[p] for p in parts], mode)
    close(weights, [0.3, 0.7] if mode == "token-mean" else [0.5, 0.5])

    x = per_token.clone().requires_grad_()
    whole = agg_loss(x, mask, mode)
    whole.backward()
    grad_whole = x.grad.clone()
    x.grad = None
    for w, p in zip(weights, parts):  # gradient accumulation, as the trainer does it
        (w * agg_loss(x[p], mask[p], mode)).backward()
    close(x.grad, grad_whole)
    accumulated = sum(w * agg_loss(per_token[p], mask[p], mode) for w, p in zip(weights, parts))
    close(accumulated, whole.detach())
    if mode == "token-mean":  # equal weights (the old 1/num_micro) differ here
        equal = sum(0.5 * agg_loss(per_token[p], mask[p], mode) for p in parts)
        assert abs(float(equal) - float(whole.detach())) > 1e-3
    # Data parallel: this rank's share of a global count of 20.
    close(micro_batch_weights([mask[p] for p in parts], "token-mean", total=20), [0.15, 0.35])
    with pytest.raises(ValueError, match="total=5 is below"):
        micro_batch_weights([mask[p] for p in parts], "token-mean", total=5)


def test_policy_loss_clip_higher_hand_computed():
    new, old, adv, mask = _policy_batch()
    # DAPO clip-higher, eps_low 0.2, eps_high 0.7: clip(ratio, 0.8, 1.7)
    # token  ratio      A    -A*ratio    -A*clip     max         clipped
    # 0      1.1051709  1    -1.1051709  -1.1051709  -1.1051709  no
    # 1      1.6487213  2    -3.2974425  -3.2974425  -3.2974425  no (0.2 clipped it)
    # 2      0.6065307  -1    0.6065307   0.8         0.8        yes
    # 3      1.6487213  -1    1.6487213   1.6487213   1.6487213  no
    loss, stats = policy_loss(new, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.7)
    close(loss, (-1.1051709 - 3.2974425 + 0.8 + 1.6487213) / 4)
    close(stats["clipfrac"], 0.25)
    loss.backward()
    close(new.grad, [[-1.1051709 / 4, -2 * 1.6487213 / 4, 0.0], [1.6487213 / 4, 0.0, 0.0]])
    # Not given: both are clip_ratio (the old behaviour).
    sym, _ = policy_loss(new, old, adv, mask, 0.2)
    low_only, _ = policy_loss(new, old, adv, mask, 0.2, clip_ratio_low=0.2)
    close(sym, low_only)
    with pytest.raises(ValueError, match="clip_ratio_low=0.2, clip_ratio_high=-0.1"):
        policy_loss(new, old, adv, mask, clip_ratio_high=-0.1)


def test_policy_loss_seq_agg_modes_hand_computed():
    new, old, adv, mask = _policy_batch()
    # per-token losses with clip 0.2 (see test_policy_loss_hand_computed):
    # row 0: [-1.1051709, -2.4, 0.8] (sum -2.7051709), row 1: [1.6487213]
    loss, _ = policy_loss(new, old, adv, mask, 0.2, loss_agg_mode="seq-mean-token-mean")
    close(loss, (-2.7051709 / 3 + 1.6487213) / 2)
    loss, _ = policy_loss(new, old, adv, mask, 0.2, loss_agg_mode="seq-mean-token-sum")
    close(loss, (-2.7051709 + 1.6487213) / 2)


@pytest.mark.parametrize("kind, expected, grad0", [
    # log r = logprob - ref = [0.5, -0.5]; token-mean over 2 tokens
    ("k1", 0.0, 0.5),                                          # d(log r)/dx = 1
    ("k2", 0.5 * 0.25, 0.5 * 0.5),                             # d(0.5 x^2) = x
    ("k3", (math.exp(-0.5) - 0.5 + math.exp(0.5) - 1.5) / 2,   # e^-x - 1 + x
     (1 - math.exp(-0.5)) / 2),                                # d = 1 - e^-x
])
def test_kl_loss_hand_computed(kind, expected, grad0):
    logprob = torch.tensor([[-1.0, -2.0, 3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, -INF]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = kl_loss(logprob, ref, mask, kind)
    close(loss, expected)
    close(stats["kl_loss"], expected)
    loss.backward()
    close(logprob.grad[0, 0], grad0)
    close(logprob.grad[0, 2], 0.0)
    assert ref.grad is None  # the reference is a fixed target


def test_value_loss_seq_mean_token_sum():
    # errors (v - R)^2 without clipping (v_old = v): row 0 [1, 4], row 1 [9]
    v = torch.tensor([[1.0, 2.0], [3.0, NAN]])
    ret = torch.tensor([[0.0, 0.0], [0.0, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = value_loss(v, v, ret, mask, 0.2, loss_agg_mode="seq-mean-token-sum")
    close(loss, 0.5 * ((1 + 4) + 9) / 2)


def test_overlong_penalty_hand_computed():
    # L_max 20, L_cache 4: no penalty up to 16, then (16 - |y|) / 4, -1 past 20.
    lengths = torch.tensor([10, 16, 17, 19, 20, 25])
    close(overlong_penalty(lengths, 20, 4), [0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
    close(overlong_penalty([17], 20, 4, penalty_factor=0.5), [-0.125])
    with pytest.raises(ValueError, match="buffer_length=0"):
        overlong_penalty(lengths, 20, 0)


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    index = ["a", "a", "b", "b", "c", "c", "d", "e"]
    # a: all 1, c: all 0 -> no signal; b mixed; d, e alone (kept, as verl does)
    assert equal_reward_groups(scores, index) == ["a", "c"]
    assert dynamic_sampling_mask(scores, index).tolist() == [False, False, True, True,
                                                             False, False, True, True]
    # interleaved tensor ids
    ids = torch.tensor([3, 4, 3, 4])
    assert dynamic_sampling_mask(torch.tensor([1.0, 0.0, 0.0, 0.0]), ids).tolist() == [
        True, False, True, False]
    assert equal_reward_groups(torch.tensor([1.0, 0.0, 0.0, 0.0]), ids) == [4]


def test_actor_config_section():
    from fusedrl.config import ConfigError, load_config

    a = load_config(None, ["actor.loss_agg_mode=seq-mean-token-sum", "actor.clip_ratio_low=0.2",
                           "actor.clip_ratio_high=0.28", "actor.use_kl_loss=true",
                           "actor.kl_loss_type=k3"]).actor
    assert (a.loss_agg_mode, a.clip_ratio_low, a.clip_ratio_high, a.use_kl_loss) == (
        "seq-mean-token-sum", 0.2, 0.28, True)
    for bad, msg in [("actor.loss_agg_mode=token-sum", "actor.loss_agg_mode='token-sum'"),
                     ("actor.kl_loss_type=k4", "actor.kl_loss_type='k4'"),
                     ("actor.clip_ratio_low=1.5", "actor.clip_ratio_low=1.5"),
                     ("actor.rollout_n=0", "actor.rollout_n=0"),
                     ("actor.kl_loss_coef=-1", "actor.kl_loss_coef=-1")]:
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            load_config(None, [bad])
