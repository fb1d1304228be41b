"""The Ray runtime: every layout gives the single-device trainer's numbers.

One Ray session for the whole test session (``ray_session`` in conftest.py: 4 CPUs;
each run starts its own workers).
"""

import json

import pytest
import torch

from fusedrl.cli.train import train
from fusedrl.config import ConfigError, load_config

# tests/test_train.py's SMALL config with a learning rate that moves the weights, so
# that a stale generation/inference copy would show in the second iteration.
SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=64", "ppo.ppo_epochs=2",
         "ppo.actor_lr=0.001", "ppo.critic_lr=0.001", "trainer.iterations=2"]
# Layouts/schedules compared at rel 1e-3..1e-5: the reference pinned to float32 (its
# bf16 default rounds logits to ~3 digits, more than these tolerances across tp/pp
# reduction orders); the bf16 reference is tested in test_frozen_dtype.py.
SMALL = SMALL + ["model.frozen_dtype=float32"]
KEYS = ("critic/score/mean", "actor/pg_loss", "critic/vf_loss", "actor/ppo_kl",
        "response_length/mean", "actor/grad_norm", "critic/grad_norm", "critic/values/mean")

PLACEMENTS = {
    "dp1tp1pp1": ["placement.default=dp1tp1pp1@0"],
    "dp2tp1pp1": ["placement.default=dp2tp1pp1@0-1"],
    "dp1tp2pp1": ["placement.default=dp1tp2pp1@0-1"],
    "dp1tp1pp2": ["placement.default=dp1tp1pp2@0-1"],
    "dp1tp2pp2": ["placement.default=dp1tp2pp2@0-3"],
    "dp2tp2pp1": ["placement.default=dp2tp2pp1@0-3"],
    # generation and critic inference apart from training (weights copied every iteration);
    # tp4 > num_kv_heads=2 replicates kv heads on the generation side.
    "separated": ["placement.default=dp2tp1pp1@0-1", "placement.actor_gen=dp1tp4pp1@0-3",
                  "placement.critic_infer=dp1tp1pp2@2-3", "placement.ref=dp1tp2pp1@2-3"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    hist = train(load_config(None, SMALL), out, show_progress=False)
    return out, hist


def _actor_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints/iter_2/actor/model.safetensors"))


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_layout_matches_single_device(name, ray_session, reference, tmp_path):
    ref_out, ref_hist = reference
    cfg = load_config(None, SMALL + ["cluster.devices=4"] + PLACEMENTS[name])
    out = tmp_path / "run"
    hist = train(cfg, out, show_progress=False)
    assert [m["iteration"] for m in hist] == [1, 2]
    for it, (a, b) in enumerate(zip(ref_hist, hist), 1):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (name, it, key)
        # the generating copy holds the trained weights: its log-probs are the trainer's
        assert b["rollout/logprob_diff_max"] < 1e-4, (name, it)
        assert "timing_s/realloc" in b
    # the checkpoint written from the sharded layout is the full HF checkpoint
    ref_w, w = _actor_weights(ref_out), _actor_weights(out)
    assert sorted(w) == sorted(ref_w)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-3, atol=1e-4, msg=k)
    assert json.loads((out / "checkpoints/iter_2/actor/config.json").read_text())


def test_placement_not_fitting_the_model_fails_before_workers(ray_session, tmp_path,
                                                             monkeypatch):
    from fusedrl.runtime import cluster as controller

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started for an invalid placement")

    monkeypatch.setattr(controller.RemoteWorker, "options", no_workers)
    cfg = load_config(None, SMALL + ["cluster.devices=4", "placement.actor_train=dp1tp3pp1@0-2"])
    with pytest.raises(ConfigError, match=r"placement.actor_train.*tp=3 does not divide "
                                          r"num_heads=4"):
        train(cfg, tmp_path / "bad", show_progress=False)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_placement_outside_the_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match=r"placement.default.*uses device 2 .* 2 devices"):
        load_config(None, ["cluster.devices=2", "placement.default=dp1tp1pp3@0-2"])
    with pytest.raises(ConfigError, match=r"placement.ref='dp2@0'"):
        load_config(None, ["placement.ref=dp2@0"])


def test_resume_of_a_sharded_run(ray_session, reference, tmp_path):
    """Weights and optimizer shards come back: a dp1tp2pp2 run stopped after one
    iteration and resumed gives the uninterrupted (single-device) second iteration."""
    _, ref_hist = reference
    base = [s for s in SMALL if not s.startswith("trainer.iterations=")] + [
        "cluster.devices=4", "placement.default=dp1tp2pp2@0-3"]
    train(load_config(None, base + ["trainer.iterations=1"]), tmp_path / "b",
          show_progress=False)
    assert (tmp_path / "b/checkpoints/iter_1/optim/actor_train_device3.pt").exists()
    resumed = train(load_config(None, base + ["trainer.iterations=2"]), tmp_path / "b",
                    resume=True, show_progress=False)
    assert [m["iteration"] for m in resumed] == [2]
    for key in KEYS:
        assert resumed[0][key] == pytest.approx(ref_hist[1][key], rel=1e-3, abs=1e-6), key
