"""vLLM generation inside the Ray runtime (runs in ``make test-vllm``; the placement
check runs everywhere).

Each ``actor_gen`` replica runs its own in-process vLLM engine on its worker. After every
training step the reallocation engine fills the replica's copy of the actor on that
device (locally where training shares the device, over the worker group where it does
not), and the worker loads it into vLLM in place. The checks: the log-probs vLLM reports
while sampling equal the trainer's recomputation (``rollout/logprob_diff_max``) also in
the iteration after a large update -- stale weights in vLLM would miss by far more --
with and without inter-stage fusion and long-tail migration.
"""

import importlib.util

import pytest

from fusedrl.config import ConfigError, load_config
from fusedrl.scheduler.interstage import InterStagePolicy, available_policies, register_policy

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (make test-vllm)")

# The default (tiny, head_dim 16: vLLM runs it padded) with a learning rate large enough
# that one step moves the log-probs far beyond the tolerance.
BASE = ["generation.backend=vllm", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8",
        "ppo.micro_batch_size=4", "generation.max_new_tokens=8", "data.num_prompts=64",
        "ppo.ppo_epochs=2", "ppo.actor_lr=0.05", "ppo.critic_lr=0.001",
        "trainer.iterations=2"]
LOGPROB_TOL = 1e-3

if "test-vllm-migrate-early" not in available_policies():
    @register_policy("test-vllm-migrate-early")
    class MigrateEarly(InterStagePolicy):
        """Rt = the whole batch: migrate as soon as the first sample finishes."""

        def threshold(self, batch_size):
            return batch_size


def _run(extra, steps=2):
    from fusedrl.runtime.launch import make_trainer

    t = make_trainer(load_config(None, BASE + extra))
    try:
        return t, [t.step() for _ in range(steps)]
    finally:
        t.close()


@needs_vllm
def test_vllm_replicas_colocated_and_separated_with_migration(ray_session):
    """Training on device 0; vLLM replicas on device 0 (weights copied locally) and
    device 1 (weights sent by the reallocation engine); inter-stage fusion migrates
    the long tail between the two engines."""
    t, hist = _run(["cluster.devices=2", "placement.default=dp1tp1pp1@0",
                    "placement.actor_gen=dp2tp1pp1@0-1", "fusion.interstage=true",
                    "fusion.interstage_policy=test-vllm-migrate-early",
                    "fusion.interstage_steps=1",
                    "generation.forced_lengths=lognormal:3,8"])
    assert type(t.stages.rollout).__name__ == "InterStageRollout"
    assert max(m["interstage/migrated"] for m in hist) > 0
    for m in hist:
        assert m["rollout/logprob_diff_max"] < LOGPROB_TOL, m["rollout/logprob_diff_max"]
        assert m["timing_s/realloc"] > 0
        assert m["perf/realloc_bytes"] > 0  # device 1's replica crossed devices
        # the staging copy was dropped once in vLLM and re-allocated for the next sync
        assert m["perf/realloc_alloc_bytes"] > 0
    assert abs(hist[0]["actor/pg_loss"]) + abs(hist[1]["actor/ppo_kl"]) > 0


@needs_vllm
def test_vllm_on_the_training_devices_loads_in_place(ray_session):
    """actor_gen placed as actor_train: each engine loads the training shard of its own
    device; nothing crosses devices."""
    _, hist = _run(["cluster.devices=2", "placement.default=dp2tp1pp1@0-1",
                    "fusion.interstage=false"])
    for m in hist:
        assert m["rollout/logprob_diff_max"] < LOGPROB_TOL, m["rollout/logprob_diff_max"]
        assert m["perf/realloc_bytes"] == 0
        assert m["timing_s/realloc"] > 0


def test_vllm_needs_single_device_replicas():
    """vLLM runs one engine per device in the Ray runtime: a tensor-parallel actor_gen
    is refused before any worker starts, naming the key."""
    from fusedrl.runtime.launch import make_trainer

    cfg = load_config(None, BASE + ["cluster.devices=2", "placement.actor_gen=dp1tp2pp1@0-1"])
    with pytest.raises(ConfigError, match=r"placement\.actor_gen=dp1tp2pp1@0-1"):
        make_trainer(cfg)


@needs_vllm
def test_vllm_migration_keeps_the_sampled_tokens(ray_session):
    """A sampled long-tail sample migrated between two vLLM engines (re-prefill) draws
    the tokens it would have drawn unmigrated: fusedrl's stream sampler continues its
    stream at its offset."""
    import torch

    from fusedrl.generation import Request, SamplingParams
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.runtime.stages import RayRollout

    t = make_trainer(load_config(None, BASE + [
        "cluster.devices=2", "placement.default=dp2tp1pp1@0-1", "generation.max_new_tokens=24",
        "fusion.interstage=true", "fusion.interstage_policy=test-vllm-migrate-early",
        "fusion.interstage_steps=2"]))
    try:
        prompts = t.setup.prompt_ids
        lengths = [2, 3, 2, 4, 3, 24, 2, 3, 20, 2]
        requests = [Request(100 + j, list(prompts[j]), max_new_tokens=n)
                    for j, n in enumerate(lengths)]
        params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3, ignore_eos=True)
        unfused = RayRollout(t.stages.cluster, t.config, t.setup).generate(requests, params)
        result = t.stages.rollout.run_fused(requests, params)
        fused = result.samples
        assert result.metrics["interstage/migrated"] >= 1
        for a, b in zip(unfused, fused):
            assert (a.sample_id, a.response_ids) == (b.sample_id, b.response_ids)
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                       rtol=1e-4, atol=1e-5)
    finally:
        t.close()


@needs_vllm
def test_resume_on_ray_workers_generates_from_the_restored_weights(tmp_path):
    """vLLM engines on two Ray workers keep their own copy of the actor: after --resume
    the reallocation engine refills them from the restored training shards, so the
    resumed iteration equals the uninterrupted one (each run in its own process)."""
    import json
    import os
    import subprocess
    import sys

    args = sum((["--set", s] for s in BASE + [
        "cluster.devices=2", "placement.default=dp1tp1pp1@0",
        "placement.actor_gen=dp2tp1pp1@0-1", "fusion.interstage=false",
        "trainer.save_every=1"]), [])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def run(out, iterations, *extra):
        proc = subprocess.run([sys.executable, "-m", "fusedrl.cli", "train", *args, "--set",
                               f"trainer.iterations={iterations}", "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full", 2)
    run(tmp_path / "cut", 1)
    a, b = full[1], run(tmp_path / "cut", 2, "--resume")[1]
    for key in ("response_length/mean", "critic/score/mean", "actor/pg_loss", "actor/ppo_kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert b["rollout/logprob_diff_max"] < LOGPROB_TOL
