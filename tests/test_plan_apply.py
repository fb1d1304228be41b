"""``fusedrl train --plan``: plans become config overrides; what the runtime cannot run
is a one-line error naming the plan field (issue 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusedrl.cli.common import DEFAULT_CONFIG
from fusedrl.cli.plan import (RunnableCost, config_with_plan, plan_overrides, runtime_problem,
                              train_micro_batch_size)
from fusedrl.config import ConfigError, load_config
from fusedrl.scheduler.plan import CallPlan, ExecutionPlan, Fusion, PlanError
from fusedrl.scheduler.plan_search import Score

ROOT = Path(__file__).resolve().parent.parent


def _plan(fusion: Fusion = Fusion(), actor_train: str = "dp1tp1pp1@0",
          critic_train: str = "dp1tp1pp1@1", train_mb: tuple[int, int] = (1, 1),
          gen: str = "dp2tp1pp1@0-1") -> ExecutionPlan:
    return ExecutionPlan.make(2, {
        "actor_gen": gen, "ref": gen, "reward": gen, "critic_infer": gen,
        "actor_train": _cp(actor_train, train_mb[0]),
        "critic_train": _cp(critic_train, train_mb[1])}, fusion)


def _cp(text: str, mb: int):
    from fusedrl.layout import Placement

    return CallPlan(Placement.parse(text), mb)


def test_plan_becomes_the_config_it_describes():
    plan = _plan(Fusion(True, "fixed", "sequential"), train_mb=(2, 2))
    cfg = config_with_plan(plan, DEFAULT_CONFIG, [])
    expected = load_config(DEFAULT_CONFIG, [
        "cluster.devices=2", "placement.actor_gen=dp2tp1pp1@0-1", "placement.ref=dp2tp1pp1@0-1",
        "placement.reward=dp2tp1pp1@0-1", "placement.critic_infer=dp2tp1pp1@0-1",
        "placement.actor_train=dp1tp1pp1@0", "placement.critic_train=dp1tp1pp1@1",
        "ppo.micro_batch_size=16",  # mini-batch 32 / (dp 1 x 2 micro-batches)
        "fusion.interstage=true", "fusion.interstage_policy=fixed",
        "fusion.intrastage=false"])
    assert cfg == expected


def test_fused_plan_sets_fused_train_and_user_overrides_win():
    plan = _plan(Fusion(False, "rlhfuse", "fused"), "dp1tp1pp2@0-1", "dp1tp1pp2@1,0")
    cfg = config_with_plan(plan, DEFAULT_CONFIG, ["ppo.micro_batch_size=8",
                                                   "fusion.interstage_policy=none"])
    assert cfg.fusion.intrastage is True and cfg.fusion.interstage is False
    assert cfg.ppo.micro_batch_size == 8 and cfg.fusion.interstage_policy == "none"
    assert cfg.placement.critic_train == "dp1tp1pp2@1,0"


def test_plan_file_round_trip(tmp_path):
    plan = _plan(Fusion(True, "rlhfuse", "sequential"))
    f = tmp_path / "plan.yaml"
    plan.save(f)
    assert config_with_plan(ExecutionPlan.load(f), DEFAULT_CONFIG, []) == \
        config_with_plan(plan, DEFAULT_CONFIG, [])


@pytest.mark.parametrize("plan, field", [
    # inter-stage fusion with a tensor-parallel generation instance
    (_plan(Fusion(True, "rlhfuse", "sequential"), gen="dp1tp2pp1@0-1"),
     "fusion.inter_stage"),
    # fused training without a pipeline
    (_plan(Fusion(False, "rlhfuse", "fused"), "dp2tp1pp1@0-1", "dp2tp1pp1@0-1"),
     "fusion.intra_stage"),
    # fused training on different devices
    (_plan(Fusion(False, "rlhfuse", "fused"), "dp1tp1pp2@0-1", "dp1tp1pp1@0"),
     "fusion.intra_stage"),
    # two micro-batch sizes where the runtime has one ppo.micro_batch_size
    (_plan(train_mb=(1, 2)), "calls.critic_train.micro_batches"),
])
def test_plans_the_runtime_cannot_run_name_the_field(plan, field):
    with pytest.raises(PlanError, match=f"plan field {field}"):
        config_with_plan(plan, DEFAULT_CONFIG, [])
    assert runtime_problem(plan, load_config(DEFAULT_CONFIG)) is not None


def test_user_cannot_turn_on_interstage_where_the_plan_cannot_take_it():
    plan = _plan(Fusion(False, "rlhfuse", "sequential"), gen="dp1tp2pp1@0-1")
    with pytest.raises(ConfigError, match="fusion.interstage=true"):
        config_with_plan(plan, DEFAULT_CONFIG, ["fusion.interstage=true"])


def test_all_three_ideas_together_are_runnable():
    """Inter-stage fusion with pipelined training and the fused schedule: the freed
    devices receive one-device inference copies, so no fusion excludes the other."""
    plan = _plan(Fusion(True, "rlhfuse", "fused"), "dp1tp1pp2@0-1", "dp1tp1pp2@1,0")
    assert runtime_problem(plan, load_config(DEFAULT_CONFIG)) is None
    cfg = config_with_plan(plan, DEFAULT_CONFIG, [])
    assert cfg.fusion.interstage is True and cfg.fusion.intrastage is True


def test_micro_batch_size_must_divide():
    plan = _plan(train_mb=(3, 3))
    with pytest.raises(PlanError, match="calls.actor_train.micro_batches"):
        train_micro_batch_size(plan, 32)
    assert "ppo.micro_batch_size=32" in plan_overrides(_plan(), 32)


def test_runnable_cost_prices_out_what_the_runtime_cannot_run():
    class Ev:
        def score(self, plan):
            return Score(1.0)

    cfg = load_config(DEFAULT_CONFIG)
    cost = RunnableCost(Ev(), cfg)
    ok = _plan(Fusion(True, "rlhfuse", "sequential"))
    bad = _plan(Fusion(True, "rlhfuse", "sequential"), gen="dp1tp2pp1@0-1")
    assert cost(ok).time_s == 1.0 and cost(bad).time_s > 100.0


def _cli(*args, timeout=600):  # a 2-device Ray run: minutes on a loaded 2-core machine
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "fusedrl", "train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_bad_plan_file_is_one_line_exit_2(tmp_path):
    f = tmp_path / "plan.yaml"
    _plan(Fusion(False, "rlhfuse", "fused"), "dp2tp1pp1@0-1", "dp2tp1pp1@0-1").save(f)
    r = _cli("--plan", str(f), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plan field fusion.intra_stage" in lines[0], r.stderr
    f.write_text("devices: 2\ncalls: {actor_gen: dp2tp1pp1@0-1}\n")
    r = _cli("--plan", str(f))
    assert r.returncode == 2 and "plan field calls: missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_train_runs_a_plan_file_on_two_devices(tmp_path):
    f = tmp_path / "plan.yaml"
    _plan(Fusion(True, "rlhfuse", "sequential")).save(f)
    out = tmp_path / "run"
    r = _cli("--plan", str(f), "--out", str(out), "--threads", "1",
             "--set", "trainer.iterations=1", "--set", "trainer.save_every=0")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["iteration"] == 1 and "interstage/rt" in row  # inter-stage fusion ran
    assert row["perf/realloc_bytes"] > 0  # actor_train -> actor_gen placements differ
