"""Token-budget micro-batches, balanced data parallelism and pad ratios (issue 19)."""

import pytest
import torch

from fusedrl.config import ConfigError, load_config
from fusedrl.cli.train import train
from fusedrl.update import (assign_dp, dp_micro_batches, micro_batches, minibatch_schedule,
                            pad_ratio, padded_tokens, unpermute)

LONG_TAILED = torch.tensor([3, 40, 5, 4, 38, 6, 5, 4, 39, 3, 7, 5, 4, 6, 41, 5])


def test_equal_lengths_give_the_sample_count_micro_batches():
    lengths = torch.full((16,), 9)
    rows = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    by_count = micro_batches(rows, lengths, 4)
    by_tokens = micro_batches(rows, lengths, 4, tokens=4 * 9)
    assert len(by_count) == len(by_tokens) == 4
    for a, b in zip(by_count, by_tokens):
        assert torch.equal(a, b)
    cfg = load_config(None, ["ppo.mini_batch_size=8", "ppo.micro_batch_size=4"]).ppo
    tok = load_config(None, ["ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
                             "ppo.micro_batch_tokens=36"]).ppo
    for a, b in zip(minibatch_schedule(64, cfg, 3, 1, lengths.repeat(4)),
                    minibatch_schedule(64, tok, 3, 1, lengths.repeat(4))):
        assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_token_budget_groups_by_length_within_the_budget():
    rows = torch.arange(len(LONG_TAILED))
    micros = micro_batches(rows, LONG_TAILED, 4, tokens=48)
    assert sorted(torch.cat(micros).tolist()) == rows.tolist()  # every row once
    assert all(t <= 48 for t in padded_tokens(micros, LONG_TAILED))
    by_count = micro_batches(rows, LONG_TAILED, 4)
    assert pad_ratio(micros, LONG_TAILED) < 1.2 < pad_ratio(by_count, LONG_TAILED)
    # a row longer than the budget goes alone
    alone = micro_batches(rows, LONG_TAILED, 4, tokens=20)
    assert [len(m) for m in alone[:4]] == [1, 1, 1, 1]


def test_unpermute_restores_row_order():
    rows = torch.arange(len(LONG_TAILED))
    micros = micro_batches(rows, LONG_TAILED, 4, tokens=48)
    parts = [LONG_TAILED[idx] * 10 for idx in micros]
    assert torch.equal(unpermute(parts, micros), LONG_TAILED * 10)


def test_assign_dp_balances_tokens_longest_first():
    assert assign_dp([5] * 6, 2) == [0, 1, 0, 1, 0, 1]  # equal costs: k % dp
    costs = [10, 1, 10, 1]  # k % dp would put 20 on rank 0 and 2 on rank 1
    owner = assign_dp(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == d) for d in range(2)]
    assert loads == [11, 11]
    with pytest.raises(ValueError, match="dp=0"):
        assign_dp(costs, 0)
    micros = micro_batches(torch.arange(16), LONG_TAILED, 4)
    ranks = dp_micro_batches(micros, LONG_TAILED, 2)
    assert sorted(k for r in ranks for k, _ in r) == list(range(len(micros)))
    assert all([k for k, _ in r] == sorted(k for k, _ in r) for r in ranks)


def test_bad_token_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="ppo.micro_batch_tokens=-1"):
        load_config(None, ["ppo.micro_batch_tokens=-1"])


SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=24", "generation.forced_lengths=lognormal:4,24",
         "data.num_prompts=64", "ppo.ppo_epochs=2", "ppo.actor_lr=0.001",
         "ppo.critic_lr=0.001", "trainer.iterations=2"]
EQUAL = ("actor/grad_norm", "critic/grad_norm", "critic/values/mean",
         "critic/advantages/mean", "actor/reward_kl_penalty", "rollout/logprob_diff_max")


@pytest.mark.slow
def test_token_budgets_equal_sample_counts_on_one_device(tmp_path):
    # second iteration: generated and inferred with the weights both updates produced
    padded = train(load_config(None, SMALL), tmp_path / "a", show_progress=False)
    budget = train(load_config(None, SMALL + ["ppo.micro_batch_tokens=64",
                                              "ppo.infer_micro_batch_tokens=64"]),
                   tmp_path / "b", show_progress=False)
    for it, (a, b) in enumerate(zip(padded, budget), 1):
        for key in EQUAL:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (it, key)
        for key in ("perf/pad_ratio/inference", "perf/pad_ratio/train"):
            assert 1.0 <= b[key] < a[key], (it, key)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("placement", ["dp2tp1pp1@0-1", "dp1tp1pp2@0-1"])
def test_token_budgets_on_ray_layouts_match_one_device(placement, ray_session, tmp_path):
    """Ray inference (rows back in order) and training with token budgets, micro-batches
    balanced over dp ranks (uneven counts per rank), equal the padded single device."""
    padded = train(load_config(None, SMALL), tmp_path / "a", show_progress=False)
    ray_run = train(load_config(None, SMALL + [
        "ppo.micro_batch_tokens=64", "ppo.infer_micro_batch_tokens=64", "cluster.devices=2",
        f"placement.default={placement}"]), tmp_path / "b", show_progress=False)
    for it, (a, b) in enumerate(zip(padded, ray_run), 1):
        for key in EQUAL[:-1]:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (it, key)
        assert b["rollout/logprob_diff_max"] < 1e-4, it
