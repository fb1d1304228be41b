"""Execution plans and their search (issue 9): YAML, memory model, search vs brute force,
determinism, ``fusedrl plan``."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fusedrl.cli.main import app
from fusedrl.config import load_config
from fusedrl.layout import ParallelLayout, Placement
from fusedrl.models.config import PRESETS
from fusedrl.scheduler.plan import CALLS, CallPlan, ExecutionPlan, Fusion, PlanError
from fusedrl.scheduler.plan_search import (CachedCost, NoFittingPlan, SearchSpace, anneal,
                                           brute_force, device_meshes, flattening, search)
from fusedrl.sim.iteration import Workload
from fusedrl.sim.plan_eval import PlanEvaluator, realloc_estimate_s
from fusedrl.sim.roofline import Hardware

TINY = PRESETS["tiny"]


def _workload(batch=8, mini=4, gen=32, prompt=16):
    return Workload.build(batch_size=batch, prompt_len=prompt, max_new_tokens=gen,
                          mini_batch_size=mini, micro_batch_size=1, max_gen_batch=8, seed=0)


def _plan(n=4) -> ExecutionPlan:
    return ExecutionPlan.make(n, {
        "actor_gen": "dp2tp1pp1@0-1", "ref": CallPlan(Placement.parse("dp1tp2pp1@2-3"), 2),
        "reward": "dp2tp1pp1@2-3", "critic_infer": "dp1tp1pp2@2-3",
        "actor_train": CallPlan(Placement.parse("dp1tp2pp2@0-3"), 4),
        "critic_train": CallPlan(Placement.parse("dp2tp1pp2@0-3"), 2)},
        Fusion(True, "rlhfuse", "fused"), "handmade")


# ----------------------------------------------------------------------------- YAML


def test_yaml_round_trip_and_overrides():
    plan = _plan()
    text = plan.to_yaml(predicted={"iteration_s": 1.5})
    back = ExecutionPlan.from_yaml(text)
    assert back == plan and back.key() == plan.key() and back.name == "handmade"
    assert yaml.safe_load(text)["fusion"] == {"inter_stage": True, "rt_policy": "rlhfuse",
                                             "intra_stage": "fused"}
    # derived reallocations: actor train -> gen, critic train -> infer (placements differ)
    assert [(r.model, r.src_call, r.dst_call) for r in plan.reallocations()] == [
        ("actor", "actor_train", "actor_gen"), ("critic", "critic_train", "critic_infer")]
    same = plan.replace_call("actor_gen", CallPlan(plan.placement("actor_train")))
    assert [r.model for r in same.reallocations()] == ["critic"]
    # the overrides make a config that runs every call where the plan says
    ov = plan.to_placement_overrides()
    cfg = load_config(None, [f"{k}={v}" for k, v in ov.items()])
    for c in CALLS:
        assert cfg.placement.of(c) == plan.placement(c)
    assert cfg.cluster.devices == 4
    assert plan.micro_batch_size("actor_train", 16) == 4  # 16 / (dp1 * 4)
    with pytest.raises(PlanError, match="calls.critic_train.micro_batches"):
        plan.micro_batch_size("critic_train", 2)


@pytest.mark.parametrize("edit, field", [
    (lambda t: t["calls"]["ref"].update(placement="dp3tp1pp1@0-1"), "calls.ref.placement"),
    (lambda t: t["calls"]["reward"].update(placement="dp2tp1pp1@3-4"), "calls.reward.placement"),
    (lambda t: t["calls"].pop("critic_infer"), "calls: missing ['critic_infer']"),
    (lambda t: t["calls"]["actor_gen"].update(micro_batches=2), "calls.actor_gen.micro_batches"),
    (lambda t: t["calls"]["ref"].update(micro_batches=0), "calls.ref.micro_batches"),
    (lambda t: t["fusion"].update(intra_stage="chimera"), "fusion.intra_stage"),
    (lambda t: t["fusion"].update(rt_policy="nope"), "fusion.rt_policy"),
    (lambda t: t.update(colour="red"), "plan field colour"),
    (lambda t: t["calls"].update(critic_gen={"placement": "dp1tp1pp1@0"}), "calls.critic_gen"),
])
def test_yaml_errors_name_the_field(edit, field):
    tree = yaml.safe_load(_plan().to_yaml())
    edit(tree)
    with pytest.raises(PlanError) as e:
        ExecutionPlan.from_yaml(yaml.safe_dump(tree))
    assert field in str(e.value)


# --------------------------------------------------------------------- cost and memory


def test_realloc_estimate_matches_the_planned_bytes():
    """The estimate's busiest receiver gets what plan_realloc sends it."""
    from fusedrl.realloc import plan_realloc

    model = PRESETS["small"]
    ev = PlanEvaluator(model, model, _workload(), 8)
    roof = ev.roof["actor"]
    for src, dst in [("dp2tp2pp1@0-3", "dp1tp4pp1@0-3"), ("dp1tp2pp2@0-3", "dp4tp1pp1@4-7"),
                     ("dp1tp1pp4@0-3", "dp2tp2pp1@2-5")]:
        s, d = Placement.parse(src), Placement.parse(dst)
        plan = plan_realloc(model, s, d, head="lm", dtype_bytes=2)
        recv = {}
        for t in plan.remote_transfers:
            recv[t.dst] = recv.get(t.dst, 0) + t.numel * 2
        bw = roof.hw.intra_node_bandwidth * roof.eff.comm_eff
        expected = max(recv.values()) / bw + model.num_layers * roof.hw.collective_latency_s
        got = realloc_estimate_s(roof, "lm", s, d)
        assert got == pytest.approx(expected, rel=0.1), (src, dst)
    assert realloc_estimate_s(roof, "lm", s, s) == 0.0


def test_memory_model_parts_and_rejection():
    big = PRESETS["llama-13b"]
    ev = PlanEvaluator(big, big, Workload.build(batch_size=64, prompt_len=128, max_new_tokens=256,
                                                mini_batch_size=16, micro_batch_size=1), 8)
    flat = ExecutionPlan.make(8, {c: "dp1tp8pp1@0-7" for c in CALLS},
                              Fusion(False, "rlhfuse", "sequential"))
    est = ev.evaluate(flat)
    assert est.fits, est.memory_error
    # 13B training states (16 B/param with dp1: 2+2+12) of actor and critic on one GPU cannot fit
    one = ExecutionPlan.make(8, {**{c: "dp1tp8pp1@0-7" for c in CALLS},
                                 "actor_train": "dp1tp1pp1@0", "critic_train": "dp1tp1pp1@1"})
    est1 = ev.evaluate(one)
    assert not est1.fits and est1.overflow_bytes > 100e9
    assert "actor training state" in est1.memory_error and "over by" in est1.memory_error
    # the flattened plan holds all four models' weights: its peak exceeds a per-call plan's
    roof = ev.roof["actor"]
    states = 2 * roof.train_state_bytes(ParallelLayout(1, 8, 1), "lm")
    assert est.peak_memory_bytes > states


# ------------------------------------------------------------------------------- search


def _small_space(ev: PlanEvaluator) -> SearchSpace:
    """2 devices, data parallelism only, one inference chunk: 8100 plans."""
    space = SearchSpace.build(2, 2, lambda c, lt: lt.tp == 1 and lt.pp == 1 and ev.layout_ok(c, lt),
                              ev.w.batch_size, ev.w.mini_batch_size, max_infer_chunks=1)
    assert space.size() == 3 ** 4 * 5 ** 2 * 4
    return space


def test_search_finds_the_brute_force_best():
    ev = PlanEvaluator(TINY, TINY, _workload(batch=8, mini=2), 2,
                       replace(Hardware(), gpus_per_node=2, hbm_bytes=1e9))
    space = _small_space(ev)
    cost = CachedCost(ev.score)
    best, best_s = brute_force(space, cost)
    assert best is not None
    res = search(space, cost, time_limit=60, seed=3, workers=1, max_steps=400)
    assert res.score.time_s == pytest.approx(best_s.time_s, rel=1e-12)
    assert res.score.fits
    # never worse than any strategy it started from
    assert all(res.score.time_s <= s.time_s + 1e-12 for _, s in res.baselines.values() if s.fits)
    # the annealing chain alone (no strategies' tuning, no final polish) also reaches it
    start = next(iter(res.baselines.values()))[0]
    chain = anneal([start], space, cost, seed=1, max_steps=3000, time_limit=60)
    assert chain.score.time_s == pytest.approx(best_s.time_s, rel=1e-12)


def test_search_is_deterministic_with_a_seed():
    ev = PlanEvaluator(TINY, TINY, _workload(batch=16, mini=8), 4,
                       replace(Hardware(), gpus_per_node=4))
    runs = [search(ev.space(), ev.score, time_limit=120, seed=7, workers=2, max_steps=150)
            for _ in range(2)]
    a, b = runs
    assert a.best.key() == b.best.key() and a.score == b.score
    assert [(c.steps, c.accepted, c.score) for c in a.chains] == \
        [(c.steps, c.accepted, c.score) for c in b.chains]
    assert len(a.chains) == 2 and all(c.steps == 150 for c in a.chains)


def test_no_plan_fits_names_what_and_by_how_much():
    big = PRESETS["llama2-70b"]
    ev = PlanEvaluator(big, big, Workload.build(batch_size=16, prompt_len=128, max_new_tokens=128,
                                                mini_batch_size=8, micro_batch_size=1), 4)
    with pytest.raises(NoFittingPlan, match=r"no plan fits memory on 4 devices.*over by [\d.]+ GB"):
        search(ev.space(), ev.score, time_limit=1, workers=1, max_steps=50,
               explain=lambda p: ev.evaluate(p, timeline=False).memory_error)


def test_meshes_are_buddy_aligned():
    assert device_meshes(4, 2) == [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (2, 2), (0, 4)]
    assert (4, 8) not in device_meshes(16, 8) and (8, 8) in device_meshes(16, 8)


# ----------------------------------------------------------------------------------- CLI


def _config(tmp_path, preset="llama-7b", devices=8):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: {preset}}}\ndata: {{max_prompt_len: 64}}\n"
                   "generation: {max_new_tokens: 128, max_batch_size: 64}\n"
                   "ppo: {rollout_batch_size: 32, mini_batch_size: 8, micro_batch_size: 1}\n"
                   f"cluster: {{devices: {devices}}}\n")
    return cfg


def test_cli_plan_json_out_and_plot(tmp_path):
    cfg = _config(tmp_path)
    out = CliRunner().invoke(app, ["plan", "--config", str(cfg), "--cluster", "1x4",
                                   "--time-limit", "1", "--max-steps", "40", "--json",
                                   "--out", str(tmp_path / "p.yaml"),
                                   "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["cluster"] == {"gpus": 4, "gpus_per_node": 4}
    best = res["best"]["iteration_s"]
    assert set(res["baselines"]) >= {"flattening", "interleaving", "separation", "heuristic"}
    for b in ("flattening", "interleaving", "separation"):
        if res["baselines"][b]["fits"]:
            assert best <= res["baselines"][b]["iteration_s"] + 1e-9
    plan = ExecutionPlan.load(tmp_path / "p.yaml")
    assert plan.to_dict()["calls"] == res["best"]["plan"]["calls"]
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("args, needle", [
    (["--cluster", "4y2"], "--cluster '4y2'"),
    (["--cluster", "0"], "--cluster '0'"),
    (["--model", "3b"], "--model '3b'"),
    (["--model", "70b", "--cluster", "2", "--time-limit", "0.5", "--workers", "1"],
     "no plan fits memory on 2 devices"),
])
def test_cli_plan_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    out = CliRunner().invoke(app, ["plan", "--config", str(_config(tmp_path))] + args)
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.output
