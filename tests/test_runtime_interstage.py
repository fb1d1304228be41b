"""Inter-stage fusion in the Ray runtime (RLHFuse §4): the same seed gives the same
samples, inference results, rewards and training with fusion on and off, also when
the long tail migrates (by re-prefill) to another instance.

Uses the session Ray fixture ``ray_session`` (tests/conftest.py).
"""

import pytest
import torch

from fusedrl.config import ConfigError, load_config
from fusedrl.scheduler.gen_cost import GenCostModel
from fusedrl.scheduler.interstage import InterStagePolicy, register_policy

from test_runtime import KEYS, SMALL


@register_policy("test-migrate-early")
class MigrateEarly(InterStagePolicy):
    """Rt = the whole batch: migrate as soon as the first sample finishes, so every
    other sample still generating on a freed instance moves."""

    def threshold(self, batch_size):
        return batch_size


DP2 = ["cluster.devices=2", "placement.default=dp2tp1pp1@0-1"]


def _trainer(extra):
    from fusedrl.runtime.controller import DistributedPPOTrainer

    return DistributedPPOTrainer(load_config(None, SMALL + DP2 + extra))


def test_fused_rollout_matches_unfused_with_migration(ray_session):
    from fusedrl.generation import Request, SamplingParams
    from fusedrl.rollout import RolloutBatch
    from fusedrl.runtime.controller import _Generation

    t = _trainer(["generation.max_new_tokens=24", "fusion.interstage=true",
                  "fusion.interstage_policy=test-migrate-early",
                  "fusion.interstage_steps=2"])
    try:
        assert t.rollout is not None
        prompts = t.setup.prompt_ids
        # forced lengths, one long tail per instance: the shared queue gives each
        # instance 5 samples, and the migration moves one instance's tail to the other
        lengths = [2, 3, 2, 4, 3, 24, 2, 3, 20, 2]
        requests = [Request(100 + j, list(prompts[j]), max_new_tokens=n)
                    for j, n in enumerate(lengths)]
        params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3, ignore_eos=True)
        ref_samples = _Generation(t).generate(requests, params)
        ref_batch = RolloutBatch.from_samples(ref_samples, t.setup.tokenizer.pad_token_id)
        assert not t.rollout.holds(ref_batch)
        ref_infer = t.infer(ref_batch)

        samples = t.rollout.generate(requests, params)
        m = t.rollout.metrics()
        assert m["interstage/rt"] == len(requests)
        assert m["interstage/migrated"] >= 1 and m["interstage/kept_instances"] == 1
        assert m["interstage/migrate_at_s"] >= 0
        for a, b in zip(ref_samples, samples):
            assert (a.sample_id, a.prompt_ids, a.response_ids) == \
                (b.sample_id, b.prompt_ids, b.response_ids)
            assert len(b.response_ids) == lengths[b.sample_id - 100]
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                       rtol=1e-4, atol=1e-5)
        batch = RolloutBatch.from_samples(samples, t.setup.tokenizer.pad_token_id)
        assert t.rollout.holds(batch)
        fused_infer = t.infer(batch)
        assert not t.rollout.holds(batch)  # used up: a later infer() recomputes
        for name, a, b in zip(("old_logp", "ref_logp", "values"), ref_infer, fused_infer):
            assert a.shape == b.shape, name
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        # every measured span is a real duration
        assert 0 < m["timing_s/gen"] <= m["timing_s/rollout"]
        assert 0 < m["timing_s/inference"] <= m["timing_s/rollout"]
        assert 0 <= m["timing_s/gen_inference_overlap"] <= m["timing_s/inference"]
        # the policy's cost model is calibrated from the measured decode steps
        assert len(t.rollout.decode_points) >= 3
        assert t.rollout.cost.decode_base_s != GenCostModel().decode_base_s
        assert t.rollout.policy.cost is t.rollout.cost
    finally:
        t.close()


def test_training_with_and_without_fusion_is_the_same(ray_session, tmp_path):
    from fusedrl.run import train

    base = SMALL + DP2 + ["generation.max_new_tokens=12"]
    off = train(load_config(None, base + ["fusion.interstage=false"]), tmp_path / "off",
                show_progress=False)
    # unset = on for two single-device generation instances
    on = train(load_config(None, base + ["fusion.interstage_policy=test-migrate-early"]),
               tmp_path / "on", show_progress=False)
    assert sum(m["interstage/migrated"] for m in on) >= 1
    assert "interstage/rt" not in off[0]
    for it, (a, b) in enumerate(zip(off, on), 1):
        for key in KEYS + ("response_length/max",):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (it, key)
        assert b["rollout/logprob_diff_max"] < 1e-4
        for key in ("timing_s/gen", "timing_s/inference", "timing_s/gen_inference_overlap",
                    "interstage/migrate_at_s"):
            assert key in b


def test_interstage_flag_validation(ray_session):
    with pytest.raises(ConfigError, match=r"fusion.interstage=true: placement of actor_gen"
                                          r".*tp=1 and pp=1"):
        _trainer(["fusion.interstage=true", "placement.actor_gen=dp1tp2pp1@0-1"])
    with pytest.raises(ConfigError, match=r"fusion.interstage_policy='nope'"):
        load_config(None, ["fusion.interstage_policy=nope"])


def test_bench_interstage_rejects_bad_arguments_before_starting_workers():
    from typer.testing import CliRunner

    from fusedrl.cli import app

    runner = CliRunner()
    for args, msg in ((["--devices", "1"], "at least 2 instances"),
                      (["--lengths", "lognormal:10,5"], "MEDIAN <= P99"),
                      (["--batch", "1"], "at least one sample per device")):
        res = runner.invoke(app, ["bench", "interstage", *args, "--json"])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
