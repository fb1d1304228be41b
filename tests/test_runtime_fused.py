"""Fused actor/critic training (RLHFuse §5): plan, validation, and the same weights as
training the two models one after the other."""

import pytest
import torch

from fusedrl.config import ConfigError, load_config
from fusedrl.layout import Placement
from fusedrl.pipeline.fused_plan import (Task, build_problem, check_node_tasks, node_tasks,
                                         sequential_tasks, shared_core_makespan, stage_map)

P = Placement.parse

# tests/test_runtime.py's SMALL run, one iteration: 2 epochs x 2 mini-batches of 2
# micro-batches per model, so four fused steps with optimizer steps in between.
SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=64", "ppo.ppo_epochs=2",
         "ppo.actor_lr=0.001", "ppo.critic_lr=0.001", "trainer.iterations=1"]
# Layouts/schedules compared at rel 1e-3..1e-5: the reference pinned to float32 (its
# bf16 default rounds logits to ~3 digits, more than these tolerances across tp/pp
# reduction orders); the bf16 reference is tested in test_frozen_dtype.py.
SMALL = SMALL + ["model.frozen_dtype=float32"]
# actor stages on devices 0, 1; critic reversed: its stage 0 on device 1 (RLHFuse's layout)
REVERSED = ["cluster.devices=2", "placement.default=dp1tp1pp2@0-1",
            "placement.critic_train=dp1tp1pp2@1,0", "placement.critic_infer=dp1tp1pp2@1,0"]
KEYS = ("critic/score/mean", "actor/pg_loss", "critic/vf_loss", "actor/ppo_kl",
        "actor/grad_norm", "critic/grad_norm", "critic/values/mean")


def test_stage_map_of_placements():
    assert stage_map(P("dp1tp1pp2@0-1"), P("dp1tp1pp2@1,0")) == (1, 0)
    assert stage_map(P("dp1tp1pp4@0-3"), P("dp1tp1pp4@0-3")) == (0, 1, 2, 3)
    # dp2: each replica's critic reversed onto the same replica's devices
    assert stage_map(P("dp2tp1pp2@0-3"), P("dp2tp1pp2@2,3,0,1")) == (1, 0)
    # tp2: a node is a tp group; the critic's stage 0 on the actor's stage 1 pair
    assert stage_map(P("dp1tp2pp2@0-3"), P("dp1tp2pp2@2,3,0,1")) == (1, 0)
    with pytest.raises(ValueError, match="same dp/tp/pp"):
        stage_map(P("dp1tp1pp2@0-1"), P("dp2tp1pp1@0-1"))
    with pytest.raises(ValueError, match="same devices"):
        stage_map(P("dp1tp1pp2@0-1"), P("dp1tp1pp2@1,2"))
    with pytest.raises(ValueError, match="not one stage of actor_train"):
        stage_map(P("dp1tp2pp2@0-3"), P("dp1tp2pp2@0,2,1,3"))
    with pytest.raises(ValueError, match="differently in different dp replicas"):
        stage_map(P("dp2tp1pp2@0-3"), P("dp2tp1pp2@2,1,0,3"))


def test_fused_train_config_is_validated():
    cfg = load_config(None, ["fusion.intrastage=true"] + REVERSED)
    assert cfg.fusion.intrastage
    with pytest.raises(ConfigError, match=r"fusion.intrastage.*same devices"):
        load_config(None, ["fusion.intrastage=true", "cluster.devices=3",
                           "placement.default=dp1tp1pp2@0-1",
                           "placement.critic_train=dp1tp1pp2@2,1"])
    with pytest.raises(ConfigError, match=r"fusion.intrastage.*Ray runtime"):
        load_config(None, ["fusion.intrastage=true"])


def _solved(microbatches=4):
    from fusedrl.scheduler.pipeline_schedule import solve

    prof = {name: [(0.010, 0.020, 2 ** 20)] * 2 for name in ("actor", "critic")}
    problem = build_problem((1, 0), (microbatches, microbatches), prof)
    return solve(problem, time_limit=2.0, seed=0, workers=1).to_dict()


def test_fused_plan_interleaves_and_is_complete():
    result = _solved()
    assert result["makespan"] < result["baseline"]["sequential_1f1b"]["makespan"]
    tasks = node_tasks(result, 2)
    for node in range(2):
        check_node_tasks(tasks[node], node, (1, 0), (4, 4))
        pipes = [t.pipeline for t in tasks[node]]
        # the two pipelines alternate on each node: not all actor work, then all critic
        assert pipes.index(1) < len(pipes) - 1 - pipes[::-1].index(0)
    # each stage of each pipeline runs its micro-batches first in, first out, so the
    # gradients accumulate in the sequential (1F1B) order
    for node in range(2):
        for kind in "FB":
            for p in (0, 1):
                mbs = [t.microbatch for t in tasks[node] if t.kind == kind and t.pipeline == p]
                assert mbs == sorted(mbs)


def test_node_tasks_are_checked():
    seq = sequential_tasks((1, 0), (2, 2))
    check_node_tasks(seq[0], 0, (1, 0), (2, 2))
    with pytest.raises(ValueError, match="not this node's"):
        check_node_tasks(seq[0][:-1], 0, (1, 0), (2, 2))
    with pytest.raises(ValueError, match="not this node's"):
        check_node_tasks(seq[1], 0, (1, 0), (2, 2))
    swapped = [Task(0, 0, 0, "B"), Task(0, 0, 0, "F")] + [
        t for t in seq[0] if (t.pipeline, t.microbatch) != (0, 0)]
    with pytest.raises(ValueError, match="backward .* before its forward"):
        check_node_tasks(swapped, 0, (1, 0), (2, 2))


def test_shared_core_makespan():
    from fusedrl.scheduler.pipeline_schedule import solve

    # independent devices: the scheduler's own makespans of the fused and 1F1B lists
    prof = {"actor": [(0.089, 0.153, 1.0), (0.066, 0.099, 1.0)],
            "critic": [(0.070, 0.116, 1.0), (0.058, 0.100, 1.0)]}
    result = solve(build_problem((1, 0), (2, 2), prof), time_limit=2.0, seed=0,
                   workers=1).to_dict()
    fused, seq = node_tasks(result, 2), sequential_tasks((1, 0), (2, 2))
    assert shared_core_makespan(fused, (1, 0), prof) * 1e3 == pytest.approx(result["makespan"])
    assert shared_core_makespan(seq, (1, 0), prof) * 1e3 == pytest.approx(
        result["baseline"]["sequential_1f1b"]["makespan"])
    # devices that slow each other down: the fused lists overlap more, so lose more;
    # with slowdown 2 (one core) nothing overlaps usefully: the sum of all tasks
    ratio = [shared_core_makespan(fused, (1, 0), prof, k) / shared_core_makespan(seq, (1, 0), prof, k)
             for k in (1.0, 1.3, 1.6)]
    assert ratio[0] < ratio[1] < ratio[2] < 1
    total = 2 * sum(f + b for st in prof.values() for f, b, _ in st)
    assert shared_core_makespan(fused, (1, 0), prof, 2.0) == pytest.approx(total)
    with pytest.raises(ValueError, match="slowdown"):
        shared_core_makespan(fused, (1, 0), prof, 0.5)
    with pytest.raises(ValueError, match="not a valid schedule"):
        shared_core_makespan([fused[0][::-1], fused[1]], (1, 0), prof)


def _weights(out, name):
    from safetensors.torch import load_file

    return load_file(str(out / f"checkpoints/iter_1/{name}/model.safetensors"))


def test_fused_training_matches_sequential(ray_session, tmp_path):
    """One PPO iteration (four optimizer steps per model) with the fused schedule gives
    the losses, gradient norms and weights of the actor-then-critic 1F1B path."""
    from fusedrl.cli.train import train

    hist = {}
    for mode in ("false", "true"):
        cfg = load_config(None, SMALL + REVERSED + [f"fusion.intrastage={mode}"])
        hist[mode] = train(cfg, tmp_path / mode, show_progress=False)[0]
    seq, fused = hist["false"], hist["true"]
    for key in KEYS:
        assert fused[key] == pytest.approx(seq[key], rel=1e-5, abs=1e-7), key
    assert fused["train_schedule/predicted_speedup"] > 1.0
    assert "train_schedule/predicted_speedup" not in seq
    for name in ("actor", "critic"):
        a, b = _weights(tmp_path / "false", name), _weights(tmp_path / "true", name)
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=f"{name} {k}")
