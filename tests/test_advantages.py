"""Advantage estimators: hand-computed values on small batches, and on random batches
against direct (loop) implementations of their definitions (verl's core_algos).

Padded positions hold NaN: they must not reach any output, which is 0 there.
"""

import math
import textwrap
from collections import defaultdict

import numpy as np
import pytest
import torch

from fusedrl.algorithms import available_adv_estimators, get_adv_estimator
from fusedrl.algorithms.advantages import register_adv_estimator
from fusedrl.algorithms.groups import group_ids

NAN = float("nan")


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


def batch(rows, width):
    """Right-padded ``[B, width]`` rewards (NaN on padding) and mask from ragged rows."""
    rewards = torch.full((len(rows), width), NAN)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        rewards[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, :len(r)] = 1
    return rewards, mask


def expand(per_sample, mask):
    """Hand value per sample -> ``[B, T]`` on the response tokens."""
    return torch.tensor(per_sample, dtype=torch.float64).unsqueeze(-1) * mask


# Groups: prompt "a" has three samples with scores 1, 2, 3 (its rewards summed over
# tokens), prompt "b" one with score 5; the samples are interleaved.
ROWS = [[0.5, 0.5], [5.0], [0.0, 0.0, 2.0], [3.0]]
INDEX = ["a", "b", "a", "a"]  # scores: a: [1, 2, 3], b: [5]


def test_registry_names_and_critic_flags():
    assert set(available_adv_estimators()) >= {
        "gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"}
    assert get_adv_estimator("gae").needs_critic
    for name in ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        assert not get_adv_estimator(name).needs_critic
    with pytest.raises(ValueError, match="unknown adv estimator 'ppo2'"):
        get_adv_estimator("ppo2")


def test_group_ids_any_index_type():
    for index in (["x", "y", "x"], np.array([7, 9, 7]), torch.tensor([7, 9, 7])):
        gid, n = group_ids(index)
        assert gid.tolist() == [0, 1, 0] and n == 2


def test_grpo_hand_computed():
    rewards, mask = batch(ROWS, 3)
    # a: mean 2, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1 -> (s - 2) / (1 + 1e-6);
    # b (alone): mean 0, std 1 -> 5 / (1 + 1e-6).
    adv, ret = get_adv_estimator("grpo")(rewards, mask, INDEX)
    e = 1 / (1 + 1e-6)
    close(adv, expand([-e, 5 * e, 0.0, e], mask), tol=1e-6)
    close(ret, adv)
    # Dr. GRPO: no division by the std.
    adv, _ = get_adv_estimator("grpo")(rewards, mask, INDEX, norm_adv_by_std_in_grpo=False)
    close(adv, expand([-1.0, 5.0, 0.0, 1.0], mask), tol=1e-6)


def test_rloo_hand_computed():
    rewards, mask = batch(ROWS, 3)
    # a: s_i minus the mean of the two others: 1 - 2.5, 2 - 2, 3 - 1.5; b alone keeps 5.
    adv, ret = get_adv_estimator("rloo")(rewards, mask, INDEX)
    close(adv, expand([-1.5, 5.0, 0.0, 1.5], mask))
    close(ret, adv)


def test_reinforce_plus_plus_hand_computed():
    rewards, mask = batch([[0.0, 1.0], [2.0]], 2)
    # gamma 0.5: returns [0 + 0.5 * 1, 1] and [2]; valid [0.5, 1, 2]: mean 7/6,
    # unbiased var ((2/3)^2 + (1/6)^2 + (5/6)^2) / 2 = 7/12, std 0.7637626.
    adv, ret = get_adv_estimator("reinforce_plus_plus")(rewards, mask, None, gamma=0.5)
    close(ret, [[0.5, 1.0], [2.0, 0.0]])
    close(adv, [[-0.8728716, -0.2182179], [1.0910894, 0.0]])


def test_reinforce_plus_plus_baseline_hand_computed():
    rewards, mask = batch(ROWS, 3)
    # s - group mean: [-1, 5, 0, 1] on 2, 1, 3, 1 tokens -> valid values
    # [-1, -1, 5, 0, 0, 0, 1]: mean 4/7, unbiased std sqrt((1260/49) / 6) = 2.0701967;
    # e.g. (-1 - 4/7) / 2.0701967 = -0.7590721.
    adv, ret = get_adv_estimator("reinforce_plus_plus_baseline")(rewards, mask, INDEX)
    lo, hi, mid, top = -0.7590721, 2.1392032, -0.2760262, 0.2070197
    close(adv, [[lo, lo, 0.0], [hi, 0.0, 0.0], [mid, mid, mid], [top, 0.0, 0.0]])
    close(ret, adv)


def test_gae_wraps_kernel_and_whitens():
    rewards, mask = batch([[0.0, 1.0], [2.0]], 2)
    values = torch.tensor([[0.5, 0.25], [1.0, NAN]])
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t -> [1 - 0.5, 1 - 0.25], [2 - 1].
    adv, ret = get_adv_estimator("gae")(rewards, mask, None, values=values, gamma=1.0,
                                        lam=1.0, whiten=False)
    close(adv, [[0.5, 0.75], [1.0, 0.0]])
    close(ret, [[1.0, 1.0], [2.0, 0.0]])
    wadv, _ = get_adv_estimator("gae")(rewards, mask, None, values=values, gamma=1.0, lam=1.0)
    # valid [0.5, 0.75, 1]: mean 0.75, unbiased std 0.25.
    close(wadv, [[-1.0, 0.0], [1.0, 0.0]], tol=1e-5)
    with pytest.raises(ValueError, match="gae: needs values"):
        get_adv_estimator("gae")(rewards, mask, None)


# ----------------------------------------------------------------------------- random inputs
# Direct implementations of the definitions, one sample and one token at a time.


def ref_scores(rewards, mask):
    return [sum(float(rewards[i, t]) for t in range(rewards.shape[1]) if mask[i, t])
            for i in range(rewards.shape[0])]


def ref_groups(scores, index):
    groups = defaultdict(list)
    for s, k in zip(scores, index):
        groups[k].append(s)
    return groups


def ref_whiten(x, mask):
    vals = [x[i][t] for i in range(len(x)) for t in range(len(x[i])) if mask[i, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return [[(x[i][t] - mean) / math.sqrt(var + 1e-8) if mask[i, t] else 0.0
             for t in range(len(x[i]))] for i in range(len(x))]


def ref_grpo(rewards, mask, index, norm=True, eps=1e-6):
    scores = ref_scores(rewards, mask)
    groups = ref_groups(scores, index)
    out = []
    for s, k in zip(scores, index):
        g = groups[k]
        if len(g) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(g) / len(g)
            std = math.sqrt(sum((v - mean) ** 2 for v in g) / (len(g) - 1))
        out.append((s - mean) / (std + eps) if norm else s - mean)
    return expand(out, mask)


def ref_rloo(rewards, mask, index):
    scores = ref_scores(rewards, mask)
    out = []
    for i, (s, k) in enumerate(zip(scores, index)):
        others = [scores[j] for j in range(len(scores)) if index[j] == k and j != i]
        out.append(s - sum(others) / len(others) if others else s)
    return expand(out, mask)


def ref_rpp(rewards, mask, gamma):
    B, T = rewards.shape
    returns = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                returns[i][t] = sum(gamma ** (k - t) * float(rewards[i, k])
                                    for k in range(t, T) if mask[i, k])
    return ref_whiten(returns, mask), returns


def ref_rpp_baseline(rewards, mask, index):
    scores = ref_scores(rewards, mask)
    groups = ref_groups(scores, index)
    centered = [s - (sum(groups[k]) / len(groups[k]) if len(groups[k]) > 1 else 0.0)
                for s, k in zip(scores, index)]
    T = rewards.shape[1]
    return ref_whiten([[c if mask[i, t] else 0.0 for t in range(T)]
                       for i, c in enumerate(centered)], mask)


def ref_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        L = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(L)):
            nxt = float(values[i, t + 1]) if t + 1 < L else 0.0
            delta = float(rewards[i, t]) + gamma * nxt - float(values[i, t])
            last = delta + gamma * lam * last
            adv[i][t], ret[i][t] = last, last + float(values[i, t])
    return ref_whiten(adv, mask), ret


def random_batch(seed):
    g = torch.Generator().manual_seed(seed)
    n_prompts = int(torch.randint(2, 6, (1,), generator=g))
    sizes = torch.randint(1, 6, (n_prompts,), generator=g).tolist()
    index = [p for p, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(index), generator=g).tolist()
    index = [f"prompt-{index[j]}" for j in perm]  # interleaved groups, string ids
    T = int(torch.randint(1, 9, (1,), generator=g))
    lengths = torch.randint(0, T + 1, (len(index),), generator=g)
    lengths[0] = T  # at least one full row; at least 2 valid tokens for whitening
    lengths[1 % len(index)] = max(int(lengths[1 % len(index)]), 1)
    if T == 1 and len(index) == 1:
        T, lengths = 2, torch.tensor([2])
    rows = [torch.randn(int(n), generator=g).tolist() for n in lengths]
    # Outcome rewards are often 0/1 with ties: round half the batches.
    if seed % 2:
        rows = [[float(round(v)) for v in r] for r in rows]
    rewards, mask = batch(rows, T)
    values = torch.randn(len(index), T, generator=g)
    return rewards, mask, index, values


@pytest.mark.parametrize("seed", range(12))
def test_estimators_equal_definitions_on_random_inputs(seed):
    rewards, mask, index, values = random_batch(seed)
    est = get_adv_estimator
    for norm in (True, False):
        adv, ret = est("grpo")(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
        close(adv, ref_grpo(rewards, mask, index, norm), tol=1e-4)
        close(ret, adv)
    close(est("rloo")(rewards, mask, index)[0], ref_rloo(rewards, mask, index), tol=1e-4)
    gamma = 0.9
    adv, ret = est("reinforce_plus_plus")(rewards, mask, index, gamma=gamma)
    ref_adv, ref_ret = ref_rpp(rewards, mask, gamma)
    close(ret, ref_ret, tol=1e-4)
    close(adv, ref_adv, tol=1e-4)
    close(est("reinforce_plus_plus_baseline")(rewards, mask, index)[0],
          ref_rpp_baseline(rewards, mask, index), tol=1e-4)
    adv, ret = est("gae")(rewards, mask, index, values=values, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.95, 0.9)
    close(ret, ref_ret, tol=1e-4)
    close(adv, ref_adv, tol=1e-4)


def test_estimators_ignore_unused_options_and_check_shapes():
    rewards, mask = batch(ROWS, 3)
    opts = dict(values=None, gamma=1.0, lam=0.95, norm_adv_by_std_in_grpo=True, whiten=True)
    for name in ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        adv, _ = get_adv_estimator(name)(rewards, mask, INDEX, **opts)
        assert adv.shape == mask.shape and torch.isfinite(adv).all()
        assert (adv[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="index has 3 entries for a batch of 4"):
        get_adv_estimator("grpo")(rewards, mask, INDEX[:3])
    with pytest.raises(ValueError, match="grpo: needs index"):
        get_adv_estimator("grpo")(rewards, mask, None)


def test_custom_estimator_from_a_user_file(tmp_path):
    user = tmp_path / "my_adv.py"
    user.write_text(textwrap.dedent('''
        import torch
        from fusedrl.algorithms import register_adv_estimator

        @register_adv_estimator("test_constant_one")
        def constant(token_level_rewards, response_mask, index, **_):
            adv = response_mask.to(torch.float32)
            return adv, adv
    '''))
    fn = get_adv_estimator(f"{user}:test_constant_one")
    rewards, mask = batch(ROWS, 3)
    assert torch.equal(fn(rewards, mask, INDEX)[0], mask.float())
    assert "test_constant_one" in available_adv_estimators() and not fn.needs_critic
    with pytest.raises(ValueError, match="registered no estimator 'other'"):
        get_adv_estimator(f"{user}:other")
    with pytest.raises(ValueError, match="does not exist"):
        get_adv_estimator(f"{tmp_path / 'missing.py'}:x")


def test_register_rejects_a_taken_name():
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        @register_adv_estimator("grpo")
        def other(token_level_rewards, response_mask, index, **_):
            return token_level_rewards, token_level_rewards


def test_config_validates_the_estimator_against_the_registry(tmp_path):
    from fusedrl.config import ConfigError, load_config

    c = load_config(None, ["algorithm.adv_estimator=rloo", "actor.rollout_n=4",
                           "algorithm.norm_adv_by_std_in_grpo=false"])
    assert (c.algorithm.adv_estimator, c.actor.rollout_n) == ("rloo", 4)
    assert load_config().algorithm.adv_estimator == "gae"  # PPO stays the default
    with pytest.raises(ConfigError, match="algorithm.adv_estimator: unknown adv estimator 'x'"):
        load_config(None, ["algorithm.adv_estimator=x"])
    user = tmp_path / "cfg_adv.py"
    user.write_text("from fusedrl.algorithms import register_adv_estimator\n"
                    "@register_adv_estimator('test_cfg_est')\n"
                    "def est(token_level_rewards, response_mask, index, **_):\n"
                    "    return token_level_rewards, token_level_rewards\n")
    load_config(None, [f"algorithm.adv_estimator={user}:test_cfg_est"])
    with pytest.raises(ConfigError, match="registered no estimator 'nope'"):
        load_config(None, [f"algorithm.adv_estimator={user}:nope"])
