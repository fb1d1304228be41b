"""Inter-stage fusion scheduling (RLHFuse §4): migration rule, cost model, simulator,
policies. Pure numpy; the scheduler must not import torch."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedrl.scheduler.gen_cost import GenCostModel
from fusedrl.scheduler.gen_sim import simulate
from fusedrl.scheduler.interstage import (KV_TRANSFER, REPREFILL, InterStagePolicy,
                                          SampleState, available_policies, choose_method,
                                          get_policy, migration_instances, plan_migration,
                                          register_policy, validate_plan)
from fusedrl.scheduler.length_dist import sample_lengths

GB = 1e9

# A sane cost model for a small cluster: per-step cost dominated by the weights at
# small batches, BSmax 32, inference ~10% of generation on long-tailed lengths.
SANE = GenCostModel(bs_max=32, weight_load_s=0.5)


def _states(counts: dict[int, int], tokens: int = 10) -> dict[int, list[SampleState]]:
    sid, out = 0, {}
    for inst, c in counts.items():
        out[inst] = [SampleState(sid + j, tokens // 2, tokens - tokens // 2) for j in range(c)]
        sid += c
    return out


# -- the m formula ---------------------------------------------------------------------------


@pytest.mark.parametrize("rt,bs_max,m_bytes,c_bytes,expected", [
    (100, 32, 1 * GB, 10 * GB, 10),  # memory-bound: ceil(100*1/10) = 10 > ceil(100/32) = 4
    (100, 32, 1 * GB, 40 * GB, 4),  # batch-bound: ceil(3.125) = 4 > ceil(2.5) = 3
    (64, 32, 0.5 * GB, 16 * GB, 2),  # both exactly 2: no rounding up to 3
    (1, 32, 1 * GB, 40 * GB, 1),
    (0, 32, 1 * GB, 40 * GB, 1),  # at least one instance
    (33, 32, 0, 40 * GB, 2),
])
def test_migration_instances_hand_worked(rt, bs_max, m_bytes, c_bytes, expected):
    assert migration_instances(rt, bs_max, m_bytes, c_bytes) == expected


def test_migration_instances_errors_name_argument():
    with pytest.raises(ValueError, match="bs_max"):
        migration_instances(10, 0, 1, 10)
    with pytest.raises(ValueError, match="threshold"):
        migration_instances(-1, 4, 1, 10)
    with pytest.raises(ValueError, match="max_sample_kv_bytes"):
        migration_instances(10, 4, 11, 10)
    with pytest.raises(ValueError, match="kv_capacity_bytes"):
        migration_instances(10, 4, 1, 0)


# -- migration plans ----------------------------------------------------------------------------


def test_plan_keeps_instances_with_most_remaining():
    cost = GenCostModel(bs_max=8, kv_bytes_per_token=1.0)  # m = ceil(16 / 8) = 2
    remaining = _states({0: 3, 1: 7, 2: 1, 3: 5})
    plan = plan_migration(remaining, threshold=16, cost=cost, max_sample_tokens=100)
    assert plan.num_instances == 2
    assert plan.kept == (1, 3) and plan.freed == (0, 2)
    moved = {mv.sample_id for mv in plan.moves}
    assert moved == {s.sample_id for i in (0, 2) for s in remaining[i]}
    assert all(mv.dst in plan.kept and mv.src in plan.freed for mv in plan.moves)
    # water-filling: instance 3 (5 samples) takes 3 of the 4, instance 1 (7) one
    dst = [mv.dst for mv in plan.moves]
    assert dst.count(3) == 3 and dst.count(1) == 1


def test_plan_tie_on_count_keeps_the_instance_holding_more_tokens():
    cost = GenCostModel(bs_max=8, kv_bytes_per_token=1.0)
    remaining = {0: [SampleState(0, 5, 5), SampleState(1, 5, 5)],
                 1: [SampleState(2, 5, 50), SampleState(3, 5, 50)]}
    plan = plan_migration(remaining, threshold=4, cost=cost, max_sample_tokens=100)
    assert plan.kept == (1,) and plan.freed == (0,)


def test_plan_none_when_nothing_to_free():
    cost = GenCostModel(bs_max=4, kv_bytes_per_token=1.0)
    remaining = _states({0: 3, 1: 3})
    assert plan_migration(remaining, threshold=8, cost=cost, max_sample_tokens=10) is None
    assert plan_migration(remaining, threshold=4, cost=cost, max_sample_tokens=10) is not None


def test_validate_plan_rejects_stranded_and_misplaced_samples():
    cost = GenCostModel(bs_max=8, kv_bytes_per_token=1.0)
    remaining = _states({0: 3, 1: 7, 2: 1, 3: 5})
    plan = plan_migration(remaining, threshold=16, cost=cost, max_sample_tokens=100)
    stranded = dataclasses.replace(plan, moves=plan.moves[1:])
    with pytest.raises(ValueError, match=f"samples \\[{plan.moves[0].sample_id}\\]"):
        validate_plan(stranded, remaining)
    wrong_src = dataclasses.replace(plan, moves=(dataclasses.replace(plan.moves[0], src=2),)
                                    + plan.moves[1:])
    with pytest.raises(ValueError, match="but it is on"):
        validate_plan(wrong_src, remaining)
    with pytest.raises(ValueError, match="partition"):
        validate_plan(dataclasses.replace(plan, freed=(0,)), remaining)


def test_plan_rejects_duplicate_sample():
    remaining = {0: [SampleState(3, 1, 1)], 1: [SampleState(3, 1, 1)]}
    with pytest.raises(ValueError, match="sample 3"):
        plan_migration(remaining, threshold=2, cost=SANE, max_sample_tokens=10)


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=2, max_size=8),
       bs_max=st.integers(1, 16), slack=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_plan_assigns_every_sample_exactly_once(counts, bs_max, slack, seed):
    rng = np.random.default_rng(seed)
    remaining, sid = {}, 0
    for inst, c in enumerate(counts):
        remaining[inst] = [SampleState(sid + j, int(rng.integers(1, 50)), int(rng.integers(0, 50)))
                           for j in range(c)]
        sid += c
    total = sid
    threshold = total + slack  # the rule fires when remaining < Rt
    cost = GenCostModel(bs_max=bs_max, kv_bytes_per_token=1.0, kv_capacity_bytes=1e9)
    plan = plan_migration(remaining, threshold=threshold, cost=cost, max_sample_tokens=100)
    m = migration_instances(threshold, bs_max, 100.0, 1e9)
    if plan is None:
        assert m >= len(counts)
        return
    validate_plan(plan, remaining)
    assert sorted(plan.kept + plan.freed) == list(range(len(counts)))
    assert len(plan.kept) == m
    # kept = the m instances with the most remaining samples
    assert min(len(remaining[k]) for k in plan.kept) >= max(len(remaining[f]) for f in plan.freed)
    final: dict[int, int] = {k: len(remaining[k]) for k in plan.kept}
    placed = [s.sample_id for k in plan.kept for s in remaining[k]]
    for mv in plan.moves:
        assert mv.src in plan.freed and mv.dst in plan.kept
        final[mv.dst] += 1
        placed.append(mv.sample_id)
    assert sorted(placed) == list(range(total))  # every sample exactly once
    # a receiving instance ends with at most ceil(R/m) < BSmax + 1 sequences
    for k in {mv.dst for mv in plan.moves}:
        assert final[k] <= max(1, math.ceil(total / m)) <= bs_max


# -- KV transfer vs re-prefill ----------------------------------------------------------------


def test_method_flips_with_bandwidth():
    # re-prefill: 1e-4 s/token; KV transfer: 1e5 B/token / bandwidth -> equal at 1e9 B/s
    base = dict(prefill_per_token_s=1e-4, kv_bytes_per_token=1e5)
    assert choose_method(GenCostModel(transfer_bandwidth=2e9, **base), 500)[0] == KV_TRANSFER
    assert choose_method(GenCostModel(transfer_bandwidth=5e8, **base), 500)[0] == REPREFILL


def test_method_flips_with_length_under_transfer_latency():
    # KV: 0.01 + 1e-5 t; re-prefill: 2e-5 t -> crossover at t = 1000 tokens
    cost = GenCostModel(transfer_latency_s=0.01, kv_bytes_per_token=1e4,
                        transfer_bandwidth=1e9, prefill_per_token_s=2e-5)
    assert choose_method(cost, 500) == (REPREFILL, pytest.approx(0.01))
    assert choose_method(cost, 2000) == (KV_TRANSFER, pytest.approx(0.03))
    remaining = {0: [SampleState(0, 100, 100)], 1: [SampleState(1, 100, 1900)],
                 2: [SampleState(2, 100, 5), SampleState(3, 100, 5)]}
    cost = GenCostModel(bs_max=4, transfer_latency_s=0.01, kv_bytes_per_token=1e4,
                        transfer_bandwidth=1e9, prefill_per_token_s=2e-5)
    plan = plan_migration(remaining, threshold=4, cost=cost, max_sample_tokens=2000)
    assert plan.kept == (2,)
    methods = {mv.sample_id: mv.method for mv in plan.moves}
    assert methods == {0: REPREFILL, 1: KV_TRANSFER}


# -- cost model ------------------------------------------------------------------------------


def test_fit_recovers_decode_model_and_bs_max():
    truth = dict(a=0.01, b=2e-4, c=3e-7)
    pts = [(bsz, ctx, truth["a"] + truth["b"] * bsz + truth["c"] * bsz * ctx)
           for bsz in (1, 2, 4, 8, 16, 32, 64, 128) for ctx in (64, 512, 2048)]
    model = GenCostModel.fit(pts, prefill_points=[(100, 0.011), (1000, 0.101)])
    assert model.decode_base_s == pytest.approx(truth["a"], rel=1e-6)
    assert model.decode_per_seq_s == pytest.approx(truth["b"], rel=1e-6)
    assert model.decode_per_ctx_token_s == pytest.approx(truth["c"], rel=1e-6)
    assert model.prefill_base_s == pytest.approx(0.001, abs=1e-9)
    assert model.prefill_per_token_s == pytest.approx(1e-4, rel=1e-6)
    ctx = np.mean([p[1] for p in pts])
    asymptote = 1.0 / (truth["b"] + truth["c"] * ctx)
    assert model.decode_throughput(model.bs_max, ctx) >= 0.9 * asymptote
    assert model.decode_throughput(model.bs_max - 1, ctx) < 0.9 * asymptote


def test_fit_keeps_coefficients_nonnegative():
    # step time that falls with context (noise): the context term is clamped to 0
    pts = [(1, 0, 1.0), (2, 10, 1.1), (4, 10, 1.2), (4, 1000, 1.19), (8, 100, 1.4)]
    model = GenCostModel.fit(pts, bs_max=16)
    assert model.decode_per_ctx_token_s == 0.0 and model.decode_per_seq_s > 0
    assert model.bs_max == 16


def test_fit_of_steps_proportional_to_context_keeps_a_step_cost():
    # measured steps ~ batch x context (as a noisy calibration on the runtime gave): the
    # unconstrained best fit has no base or per-sequence term, which makes a decode step
    # free at zero context; the fit keeps one of them instead of failing
    pts = [(1, 10, 0.0013), (2, 10, 0.0026), (4, 20, 0.0104), (2, 40, 0.0104)]
    model = GenCostModel.fit(pts, bs_max=4)
    assert model.decode_base_s + model.decode_per_seq_s > 0
    assert model.decode_step_s(4, 80) > 0


def test_cost_model_errors_name_the_field():
    with pytest.raises(ValueError, match="transfer_bandwidth"):
        GenCostModel(transfer_bandwidth=0)
    with pytest.raises(ValueError, match="weight_load_s"):
        GenCostModel(weight_load_s=-1)
    with pytest.raises(ValueError, match="bs_max"):
        GenCostModel(bs_max=0)
    with pytest.raises(ValueError, match="profile_points"):
        GenCostModel.fit([(1, 2, 3)])


# -- simulator -----------------------------------------------------------------------------


def test_simulator_single_sample_hand_worked():
    cost = GenCostModel(decode_base_s=1.0, decode_per_seq_s=0.5, decode_per_ctx_token_s=0.1,
                        prefill_per_token_s=0.25, infer_per_token_s=0.1, weight_load_s=1.0)
    r = simulate([3], cost, num_instances=1, max_batch=4, prompt_lengths=2)
    # prefill 2*0.25 = 0.5; steps at context 2, 3, 4: 1.7 + 1.8 + 1.9
    assert r.gen_end_s == pytest.approx(0.5 + 5.4)
    # then load 1.0 and infer 5 tokens * 0.1
    assert r.makespan_s == pytest.approx(5.9 + 1.0 + 0.5)


def _unit_step_cost(**kw) -> GenCostModel:
    # 1 s per decode step whatever the batch; prompts are empty, so only a re-prefill
    # (0.1 s per token) costs prefill time
    return GenCostModel(decode_base_s=1.0, decode_per_seq_s=0.0, decode_per_ctx_token_s=0.0,
                        prefill_per_token_s=0.1, bs_max=4, kv_bytes_per_token=1.0,
                        infer_per_token_s=0.01, weight_load_s=0.5, **kw)


def test_simulator_migration_by_kv_transfer_hand_worked():
    # round-robin dispatch: instance 0 holds samples 0 (10 tokens) and 2 (2 tokens),
    # instance 1 sample 1 (10 tokens). Sample 2 ends at t=2: 2 remain < Rt=3, m = 1;
    # tie on count and tokens keeps instance 0; sample 1 (2 tokens done) moves by KV
    # (arrives just after 2), joins at the boundary t=3 and needs 8 more steps.
    r = simulate([10, 10, 2], _unit_step_cost(transfer_bandwidth=1e9), num_instances=2,
                 max_batch=2, threshold=3)
    assert r.migration_at_s == pytest.approx(2.0)
    assert r.plan.kept == (0,) and r.plan.freed == (1,)
    assert [(mv.sample_id, mv.src, mv.dst, mv.method) for mv in r.plan.moves] == [
        (1, 1, 0, KV_TRANSFER)]
    np.testing.assert_allclose(r.finish_s, [10.0, 11.0, 2.0])
    assert r.migration_time_s == pytest.approx(1.0)
    # the freed instance loads weights at 2 and infers sample 2 at once, then the others
    infer = sorted((iv.start, iv.instance, iv.sample_id) for iv in r.timeline if iv.kind == "infer")
    assert infer[0] == (pytest.approx(2.5), 1, 2)
    assert r.infer_end_s == pytest.approx(11.0 + 0.1)


def test_kept_instance_joins_inference_when_its_tail_ends():
    # the same run with 1 s of inference per token: the freed instance (ready 2.5)
    # infers sample 2 in [2.5, 4.5] and sample 0 in [10, 20]; instance 0's tail ends
    # at 11, it loads weights until 11.5 and infers sample 1 in [11.5, 21.5]
    cost = GenCostModel(**{**_unit_step_cost(transfer_bandwidth=1e9).__dict__,
                           "infer_per_token_s": 1.0})
    r = simulate([10, 10, 2], cost, num_instances=2, max_batch=2, threshold=3)
    infer = sorted((iv.sample_id, iv.instance, iv.start, iv.end)
                   for iv in r.timeline if iv.kind == "infer")
    assert infer == [(0, 1, 10.0, 20.0), (1, 0, 11.5, 21.5), (2, 1, 2.5, 4.5)]
    assert r.makespan_s == pytest.approx(21.5) and r.gen_end_s == pytest.approx(11.0)
    assert r.overlap_s == pytest.approx(11.0 - 2.5)


def test_simulator_migration_by_reprefill_hand_worked():
    # slow link: re-prefill wins; sample 1 resumes at t=2 after a 0.2 s prefill
    # of its 2 tokens, so both long samples end together at 10.2
    r = simulate([10, 10, 2], _unit_step_cost(transfer_bandwidth=1.0), num_instances=2, max_batch=2, threshold=3)
    assert r.plan.moves[0].method == REPREFILL
    np.testing.assert_allclose(r.finish_s, [10.2, 10.2, 2.0])
    assert r.migration_time_s == pytest.approx(0.2)


def test_rt_zero_fused_equals_unfused():
    lengths = sample_lengths("lognormal:64,640", 96, seed=5, max_len=1024)
    kw = dict(num_instances=4, max_batch=16, prompt_lengths=32)
    unfused = simulate(lengths, SANE, **kw)
    fused = simulate(lengths, SANE, threshold=0, **kw)
    assert fused.fused and not unfused.fused
    assert fused.num_migrated == 0 and fused.migration_at_s is None
    np.testing.assert_array_equal(fused.finish_s, unfused.finish_s)
    np.testing.assert_array_equal(fused.infer_done_s, unfused.infer_done_s)
    assert fused.makespan_s == unfused.makespan_s
    none = simulate(lengths, SANE, policy=get_policy("none", cost=SANE, num_instances=4,
                                                     max_batch=16), **kw)
    assert none.makespan_s == unfused.makespan_s


def test_fused_beats_unfused_on_long_tail_and_gains_little_on_uniform():
    kw = dict(num_instances=4, max_batch=32, prompt_lengths=64)
    gains = {}
    for spec in ("lognormal:64,640", "uniform:90,110"):
        lengths = sample_lengths(spec, 128, seed=3, max_len=1024)
        unfused = simulate(lengths, SANE, **kw)
        fused = simulate(lengths, SANE, threshold=26, **kw)  # RLHFuse's ~20%
        assert fused.num_migrated > 0
        gains[spec] = unfused.makespan_s / fused.makespan_s - 1
        if spec.startswith("lognormal"):
            assert fused.makespan_s < unfused.makespan_s
            assert fused.overlap_s > 0.5 * unfused.gen_end_s  # inference under the tail
    assert gains["lognormal:64,640"] > 0.04
    assert abs(gains["uniform:90,110"]) < 0.02
    assert gains["lognormal:64,640"] > 3 * abs(gains["uniform:90,110"])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 5), max_batch=st.integers(1, 12),
       frac=st.floats(0, 1), bw=st.sampled_from([1e6, 25e9]))
def test_simulator_invariants(seed, n, max_batch, frac, bw):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 60))
    lengths = rng.integers(1, 200, size=size)
    prompts = rng.integers(0, 50, size=size)
    cost = GenCostModel(bs_max=4, weight_load_s=0.3, transfer_bandwidth=bw)
    kw = dict(num_instances=n, max_batch=max_batch, prompt_lengths=prompts)
    unfused = simulate(lengths, cost, **kw)
    r = simulate(lengths, cost, threshold=int(round(frac * size)), **kw)
    assert np.isfinite(r.finish_s).all() and np.isfinite(r.infer_done_s).all()
    # generation cannot beat one instance per sample at batch 1 with no prefill
    single = np.array([cost.decode_step_s(1, p) * k + cost.decode_per_ctx_token_s * k * (k - 1) / 2
                       for p, k in zip(prompts, lengths)])
    assert (r.finish_s >= single - 1e-9).all()
    avail = {}
    for iv in r.timeline:
        if iv.kind == "load":
            avail[iv.instance] = iv.end
    by_instance: dict[int, list] = {}
    for iv in r.timeline:
        if iv.kind == "infer":
            assert iv.start >= r.finish_s[iv.sample_id] - 1e-9
            assert iv.start >= avail[iv.instance] - 1e-9
            by_instance.setdefault(iv.instance, []).append((iv.start, iv.end))
    for spans in by_instance.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))
    assert sum(len(v) for v in by_instance.values()) == size
    if r.plan is not None:
        # freed instances never generate after the migration; moved samples finish after it
        for iv in r.timeline:
            if iv.kind == "gen" and iv.instance in r.plan.freed:
                assert iv.end <= r.migration_at_s + cost.decode_step_s(max_batch, 1e4) + 1e-9
        for mv in r.plan.moves:
            assert r.finish_s[mv.sample_id] > r.migration_at_s
    else:
        np.testing.assert_allclose(r.infer_done_s, unfused.infer_done_s)


def test_simulator_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_instances"):
        simulate([1, 2], SANE, num_instances=0, max_batch=2)
    with pytest.raises(ValueError, match="max_batch"):
        simulate([1, 2], SANE, num_instances=1, max_batch=0)
    with pytest.raises(ValueError, match="output_lengths"):
        simulate([0, 2], SANE, num_instances=1, max_batch=2)
    with pytest.raises(ValueError, match="threshold"):
        simulate([1, 2], SANE, num_instances=1, max_batch=2, threshold=-1)


# -- policies -----------------------------------------------------------------------------------


def test_rlhfuse_threshold_is_best_of_brute_force_sweep():
    lengths = sample_lengths("lognormal:64,640", 128, seed=3, max_len=1024)
    prompts = np.full(128, 64)
    policy = get_policy("rlhfuse", cost=SANE, num_instances=4, max_batch=32, window=1)
    assert policy.threshold(128) == round(0.2 * 128)  # before any observation
    policy.observe(lengths, prompts)
    rt = policy.threshold(128)
    kw = dict(num_instances=4, max_batch=32, prompt_lengths=prompts)
    sweep = {cand: simulate(lengths, SANE, threshold=cand, **kw).makespan_s
             for cand in [0] + [round(f * 128) for f in np.arange(0.05, 0.96, 0.05)]}
    best = min(sweep.values())
    assert simulate(lengths, SANE, threshold=rt, **kw).makespan_s == pytest.approx(best)
    assert rt > 0 and best < sweep[0]


def test_rlhfuse_retunes_every_k_iterations():
    long_tail = sample_lengths("lognormal:64,640", 128, seed=3, max_len=1024)
    fixed = sample_lengths("fixed:100", 128)
    policy = get_policy("rlhfuse", cost=SANE, num_instances=4, max_batch=32, window=1,
                        retune_every=2)
    policy.observe(long_tail)
    tuned = policy.threshold(128)
    assert tuned > 0
    policy.observe(fixed)  # one iteration of drift: not yet re-tuned
    assert policy.threshold(128) == tuned
    policy.observe(fixed)
    # equal lengths finish together: nothing gains from migration, ties go to Rt = 0
    assert policy.threshold(128) == 0
    assert set(policy.last_sweep.values()) == {policy.last_sweep[0]}
    assert policy.threshold(256) == 0  # the fraction carries over to other batch sizes


def test_fixed_and_none_policies():
    fixed = get_policy("fixed", cost=SANE, num_instances=2, max_batch=8, fraction=0.25)
    assert fixed.threshold(100) == 25
    none = get_policy("none", cost=SANE, num_instances=2, max_batch=8)
    assert none.threshold(100) == 0
    assert none.plan(_states({0: 1, 1: 1}), threshold=10, max_sample_tokens=10) is None
    with pytest.raises(ValueError, match="fraction"):
        get_policy("fixed", cost=SANE, num_instances=2, max_batch=8, fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        fixed.threshold(0)


def test_user_policy_plugs_in():
    calls = []

    @register_policy("test-half-then-one")
    class HalfThenOne(InterStagePolicy):
        def threshold(self, batch_size):
            return batch_size // 2

        def plan(self, remaining_per_instance, *, threshold, max_sample_tokens):
            calls.append(threshold)
            # consolidate the tail onto one instance, whatever Rt was
            return plan_migration(remaining_per_instance, threshold=1, cost=self.cost,
                                  max_sample_tokens=max_sample_tokens)

    assert "test-half-then-one" in available_policies()
    policy = get_policy("test-half-then-one", cost=SANE, num_instances=3, max_batch=8)
    assert isinstance(policy, HalfThenOne) and policy.name == "test-half-then-one"
    lengths = sample_lengths("lognormal:32,320", 24, seed=1)
    r = simulate(lengths, SANE, num_instances=3, max_batch=8, policy=policy)
    assert calls == [12] and r.threshold == 12
    assert len(r.plan.kept) == 1
    assert r.plan.freed == tuple(sorted(set(range(3)) - set(r.plan.kept)))

    @register_policy("test-strands-samples")
    class Strands(InterStagePolicy):
        def threshold(self, batch_size):
            return batch_size

        def plan(self, remaining_per_instance, *, threshold, max_sample_tokens):
            plan = plan_migration(remaining_per_instance, threshold=1, cost=self.cost,
                                  max_sample_tokens=max_sample_tokens)
            return dataclasses.replace(plan, moves=())

    with pytest.raises(ValueError, match="without moving them"):
        simulate(lengths, SANE, num_instances=3, max_batch=8,
                 policy=get_policy("test-strands-samples", cost=SANE, num_instances=3,
                                   max_batch=8))
    with pytest.raises(ValueError, match="already registered"):
        register_policy("test-half-then-one")(type("Other", (InterStagePolicy,), {}))
    with pytest.raises(TypeError, match="not an InterStagePolicy"):
        register_policy("bad")(object)


def test_get_policy_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="'nope'.*fixed, none.*rlhfuse"):
        get_policy("nope")


# -- lengths and purity ---------------------------------------------------------------------------


def _forced_lengths():
    """``fusedrl.generation.lengths.forced_lengths`` without importing the package
    (whose ``__init__`` loads the torch engine): the module itself is numpy only."""
    import importlib.util
    from pathlib import Path

    import fusedrl

    path = Path(fusedrl.__file__).parent / "generation" / "lengths.py"
    spec = importlib.util.spec_from_file_location("_forced_lengths_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.forced_lengths


def test_sample_lengths_match_forced_lengths():
    forced_lengths = _forced_lengths()

    for spec in ("lognormal:100,900", "uniform:5,50", "fixed:7"):
        assert sample_lengths(spec, 200, seed=4, max_len=512).tolist() == \
            forced_lengths(spec, 200, seed=4, max_len=512)
    long_tail = sample_lengths("lognormal:100,1000", 20000, seed=0)
    assert np.percentile(long_tail, 99) == pytest.approx(1000, rel=0.1)
    assert np.median(long_tail) == pytest.approx(100, rel=0.05)
    with pytest.raises(ValueError, match="lognormal:MEDIAN,P99"):
        sample_lengths("gamma:1,2", 3)
