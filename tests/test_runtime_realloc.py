"""Weights between placements travel through the reallocation engine (ReaLHF, arXiv
2406.14088): the training loop still gives the single-device trainer's numbers, the
generating copy holds the trained weights, and both ``placement.keep_inference_copies``
values work.

Uses the session Ray instance (``ray_session`` in conftest.py).
"""

import pytest
import torch

from fusedrl.cli.train import train
from fusedrl.config import load_config
from fusedrl.layout import Placement
from fusedrl.realloc import plan_realloc
from fusedrl.realloc.weight_sync import free_storage, restore_storage, sync_pairs
from fusedrl.trainer import build_setup

# tests/test_runtime.py's SMALL run (a learning rate that moves the weights, so that a
# stale copy would show in the second iteration), one epoch to keep it short.
SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=64", "ppo.ppo_epochs=1",
         "ppo.actor_lr=0.001", "ppo.critic_lr=0.001", "trainer.iterations=2"]
# Layouts/schedules compared at rel 1e-3..1e-5: the reference pinned to float32 (its
# bf16 default rounds logits to ~3 digits, more than these tolerances across tp/pp
# reduction orders); the bf16 reference is tested in test_frozen_dtype.py.
SMALL = SMALL + ["model.frozen_dtype=float32"]
KEYS = ("critic/score/mean", "actor/pg_loss", "critic/vf_loss", "actor/ppo_kl",
        "response_length/mean", "actor/grad_norm", "critic/grad_norm", "critic/values/mean")
# Training dp2 on 0-1; generation tp4 over all devices (kv heads replicated, overlapping
# the training devices), critic inference pp2 across the training boundary, the reference
# tp2 on devices the actor does not train on.
PLACED = {"default": "dp2tp1pp1@0-1", "actor_gen": "dp1tp4pp1@0-3",
          "critic_infer": "dp1tp1pp2@1-2", "ref": "dp1tp2pp1@2-3"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(load_config(None, SMALL), tmp_path_factory.mktemp("ref") / "run",
                 show_progress=False)


@pytest.mark.parametrize("keep", [True, False])
def test_weights_travel_through_the_engine(keep, ray_session, reference, tmp_path):
    cfg = load_config(None, SMALL + ["cluster.devices=4", "trainer.save_every=100",
                                     f"placement.keep_inference_copies={str(keep).lower()}"]
                      + [f"placement.{k}={v}" for k, v in PLACED.items()])
    hist = train(cfg, tmp_path / "run", show_progress=False)
    # bytes the plans move across devices after each step: what the engine must report
    mc = build_setup(cfg).model_config
    p = {r: Placement.parse(v) for r, v in PLACED.items()}
    expected = (plan_realloc(mc, p["default"], p["actor_gen"], "lm").bytes_moved
                + plan_realloc(mc, p["default"], p["critic_infer"], "value").bytes_moved)
    assert [m["iteration"] for m in hist] == [1, 2]
    for it, (a, b) in enumerate(zip(reference, hist), 1):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (keep, it, key)
        # the generating copy holds the trained weights: its log-probs are the trainer's
        assert b["rollout/logprob_diff_max"] < 1e-4, (keep, it)
        assert b["timing_s/realloc"] > 0
        assert b["perf/realloc_bytes"] == expected
        # a dropped copy is re-allocated by every sync; a kept one never
        assert (b["perf/realloc_alloc_bytes"] > 0) == (not keep)


def test_sync_pairs():
    same = {r: "dp1tp1pp1@0" for r in ("actor_train", "actor_gen", "critic_train",
                                       "critic_infer", "ref")}
    roles = list(same)
    assert sync_pairs(same, roles) == ([("actor_train", "ref")], [])
    apart = dict(same, actor_gen="dp1tp2pp1@0-1")
    assert sync_pairs(apart, roles) == ([("actor_train", "ref")],
                                        [("actor_train", "actor_gen")])


def test_free_and_restore_storage_keep_the_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    params = list(model.parameters())
    freed = free_storage(model)
    assert freed == sum(p.numel() * 4 for p in params)
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    assert free_storage(model) == 0  # already dropped
    assert restore_storage(model) == freed
    assert list(model.parameters()) == params  # same Parameter objects, usable again
    with torch.no_grad():
        for p in params:
            p.fill_(1.0)
    assert model(torch.ones(2, 4)).shape == (2, 3)
    shared = torch.nn.Linear(4, 4)
    shared.weight = torch.nn.Parameter(torch.empty(8, 4)[:4])
    shared.bias = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="shares its storage"):
        free_storage(shared)
