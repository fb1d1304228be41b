"""DAPO in the iteration: dynamic sampling (equal-score groups dropped and refilled) and
the overlong penalty, through Trainer.step."""

from __future__ import annotations

import pytest
import torch

from fusedrl.algorithms.ppo import overlong_penalty
from fusedrl.config import ConfigError, load_config

GRPO = ["algorithm.adv_estimator=grpo", "actor.rollout_n=2", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=8", "ppo.micro_batch_size=4", "generation.max_new_tokens=4",
        "data.num_prompts=64", "trainer.iterations=3"]


def coin(prompt, response, label):
    """Half of the responses score 1: a group of two is all-equal half of the time."""
    return float(bool(response) and ord(response[0]) % 2 == 0)


def zero(prompt, response, label):
    return 0.0


def _run(extra, iterations=3):
    """Metrics, and what each update trained on (batch, targets)."""
    from fusedrl.runtime.launch import make_trainer

    t = make_trainer(load_config(None, GRPO + extra))
    seen = []
    train = t.stages.update.train

    def spy(batch, targets, schedule):
        seen.append((batch, targets))
        return train(batch, targets, schedule)

    t.stages.update.train = spy
    try:
        return [t.step() for _ in range(iterations)], seen
    finally:
        t.close()


def test_equal_score_groups_are_dropped_and_refilled():
    hist, seen = _run(["algorithm.filter_groups.enable=true",
                       "algorithm.filter_groups.max_num_gen_batches=20",
                       "reward.function=test_dapo:coin"])
    assert sum(m["filter_groups/groups_dropped"] for m in hist) > 0
    assert any(m["filter_groups/num_gen_batches"] > 1 for m in hist)  # refilled
    for m, (batch, targets) in zip(hist, seen):
        assert m["filter_groups/short"] == 0 and m["filter_groups/groups_kept"] == 4
        assert len(batch) == 8  # rollout_batch_size groups of rollout_n
        # every kept group has a score spread: its GRPO advantages are not all zero
        adv = (targets["advantages"] * targets["response_mask"]).abs().sum(1).view(4, 2)
        assert bool((adv.sum(1) > 0).all())
        assert len(set(batch.sample_ids.tolist())) == 8  # no sample twice


def test_cap_trains_on_the_last_round():
    hist, seen = _run(["algorithm.filter_groups.enable=true",
                       "algorithm.filter_groups.max_num_gen_batches=2",
                       "reward.function=test_dapo:zero"], iterations=1)
    m = hist[0]
    assert m["filter_groups/num_gen_batches"] == 2 and m["filter_groups/short"] == 1
    assert m["filter_groups/groups_dropped"] == 8 and m["filter_groups/groups_kept"] == 0
    assert len(seen[0][0]) == 8


def test_overlong_penalty_is_added_to_the_scores():
    hist, seen = _run(["reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=2",
                       "reward.overlong_buffer.penalty_factor=0.5",
                       "reward.function=test_dapo:zero"], iterations=1)
    batch = seen[0][0]
    want = overlong_penalty(batch.response_lens, 4, 2, 0.5)
    assert float(want.min()) < 0  # some response ran into the buffer
    assert hist[0]["critic/score/mean"] == pytest.approx(float(want.mean()))
    assert hist[0]["reward/overlong_penalty/mean"] == pytest.approx(float(want.mean()))


def test_dapo_keys_are_checked():
    with pytest.raises(ConfigError, match="algorithm.filter_groups.max_num_gen_batches=0"):
        load_config(None, ["algorithm.filter_groups.max_num_gen_batches=0"])
    with pytest.raises(ConfigError, match="reward.overlong_buffer.len=9"):
        load_config(None, ["reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=9",
                           "generation.max_new_tokens=8"])
