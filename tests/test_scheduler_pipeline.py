"""Fused pipeline schedules (RLHFuse §5): format, bounds, baselines, search optimality.

Every result is checked by an independent validator written here from docs/design.md's
contract (not by the library's own evaluator), and tiny problems are solved by
brute force over all per-node task orders.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fusedrl.kernels import schedule_eval as ke
from fusedrl.scheduler.pipeline_baselines import greedy_fused, one_f_one_b, start_candidates
from fusedrl.scheduler.pipeline_bounds import lower_bound, memory_lower_bound
from fusedrl.scheduler.pipeline_families import actor_critic_problem
from fusedrl.scheduler.pipeline_problem import FusedProblem, Schedule, TaskTable, fifo_relabel
from fusedrl.scheduler.pipeline_schedule import side_by_side_peak, solve, time_schedule
from fusedrl.scheduler.pipeline_search import SearchConfig

FAST = SearchConfig(max_runs=3, min_run_iters=2_000, memory_iters_per_task=50)


# --------------------------------------------------------------------------- helpers


def per_stage(value, stages):
    return list(value) if isinstance(value, list) else [value] * stages


def check_result(problem: dict, out: dict) -> None:
    """Validates a result against docs/design.md's contract, recomputing everything."""
    tasks = out["tasks"]
    by_key = {}
    for t in tasks:
        key = (t["pipeline"], t["microbatch"], t["stage"], t["kind"])
        assert key not in by_key, f"task {key} appears twice"
        by_key[key] = t
        assert t["end"] > t["start"] >= 0
    expected = 0
    work = 0.0
    for i, p in enumerate(problem["pipelines"]):
        S, M = len(p["stage_nodes"]), p["microbatches"]
        fwd, bwd = per_stage(p["fwd"], S), per_stage(p["bwd"], S)
        name = p.get("name", f"pipeline{i}")
        for m in range(M):
            for s in range(S):
                for kind, dur in (("F", fwd[s]), ("B", bwd[s])):
                    t = by_key[(name, m, s, kind)]
                    assert t["node"] == p["stage_nodes"][s]
                    assert t["end"] - t["start"] == pytest.approx(dur)
                    expected += 1
                    work += dur
                # a forward follows the previous stage's forward; backwards run in reverse
                if s > 0:
                    assert by_key[(name, m, s, "F")]["start"] >= by_key[(name, m, s - 1, "F")]["end"] - 1e-9
                if s < S - 1:
                    assert by_key[(name, m, s, "B")]["start"] >= by_key[(name, m, s + 1, "B")]["end"] - 1e-9
            assert by_key[(name, m, S - 1, "B")]["start"] >= by_key[(name, m, S - 1, "F")]["end"] - 1e-9
    assert len(tasks) == expected
    # one task per node at a time
    for n in range(problem["nodes"]):
        mine = sorted((t for t in tasks if t["node"] == n), key=lambda t: t["start"])
        for a, b in zip(mine, mine[1:]):
            assert b["start"] >= a["end"] - 1e-9, f"node {n} runs two tasks at once"
    # peak memory: a forward holds mem from its start to its backward's end
    mem = {p.get("name", f"pipeline{i}"): per_stage(p.get("mem", 1.0), len(p["stage_nodes"]))
           for i, p in enumerate(problem["pipelines"])}
    peak = 0.0
    for n in range(problem["nodes"]):
        events = []
        for t in tasks:
            if t["node"] == n:
                m = mem[t["pipeline"]][t["stage"]]
                events.append((t["start"], 1, m) if t["kind"] == "F" else (t["end"], 0, -m))
        level = 0.0
        for _, _, delta in sorted(events):  # releases before allocations at equal times
            level += delta
            peak = max(peak, level)
    assert out["peak_memory"] == pytest.approx(peak)
    makespan = max(t["end"] for t in tasks)
    assert out["makespan"] == pytest.approx(makespan)
    assert out["bubble_ratio"] == pytest.approx(1 - work / (problem["nodes"] * makespan))
    assert out["lower_bound"] <= makespan + 1e-9


def simple_times(problem: FusedProblem, orders: list[list[tuple]]):
    """Independent evaluator: per-node orders of (pipeline, mb, stage, kind) -> makespan or None."""
    dur, deps = {}, {}
    for p, spec in enumerate(problem.pipelines):
        S = spec.num_stages
        for m in range(spec.microbatches):
            chain = [(p, m, s, "F") for s in range(S)] + [(p, m, s, "B") for s in reversed(range(S))]
            for i, key in enumerate(chain):
                dur[key] = spec.fwd[key[2]] if key[3] == "F" else spec.bwd[key[2]]
                deps[key] = chain[i - 1] if i else None
    end, heads, free = {}, [0] * len(orders), [0.0] * len(orders)
    progress = True
    while progress:
        progress = False
        for n, order in enumerate(orders):
            while heads[n] < len(order):
                key = order[heads[n]]
                d = deps[key]
                if d is not None and d not in end:
                    break
                start = max(free[n], end[d] if d is not None else 0.0)
                end[key] = free[n] = start + dur[key]
                heads[n] += 1
                progress = True
    if len(end) < len(dur):
        return None
    return max(end.values())


def simple_peak(problem: FusedProblem, orders: list[list[tuple]]) -> float:
    peak = 0.0
    for order in orders:
        level = 0.0
        for p, _, s, kind in order:
            level += problem.pipelines[p].mem[s] * (1 if kind == "F" else -1)
            peak = max(peak, level)
    return peak


def node_sequences(tasks: list[tuple]):
    """All orders of a node's tasks that keep each micro-batch chain's own order."""
    def rank(key):
        p, m, s, kind = key
        return s if kind == "F" else 10_000 - s

    def rec(left, prefix):
        if not left:
            yield list(prefix)
            return
        for i, key in enumerate(left):
            if any(o[:2] == key[:2] and rank(o) < rank(key) for o in left):
                continue  # an earlier task of its own chain is still unplaced
            yield from rec(left[:i] + left[i + 1:], prefix + [key])

    yield from rec(tasks, [])


def brute_force(problem: FusedProblem, memory_cap: float = math.inf) -> float:
    per_node = [[] for _ in range(problem.nodes)]
    for p, spec in enumerate(problem.pipelines):
        for m in range(spec.microbatches):
            for s, n in enumerate(spec.stage_nodes):
                per_node[n] += [(p, m, s, "F"), (p, m, s, "B")]
    best = math.inf
    for orders in itertools.product(*[list(node_sequences(t)) for t in per_node]):
        if simple_peak(problem, list(orders)) > memory_cap:
            continue
        mk = simple_times(problem, list(orders))
        if mk is not None:
            best = min(best, mk)
    return best


def brute_force_lexicographic(problem: FusedProblem) -> tuple[float, float]:
    """The least ``(makespan, peak memory)`` over all per-node orders, makespan first."""
    per_node = [[] for _ in range(problem.nodes)]
    for p, spec in enumerate(problem.pipelines):
        for m in range(spec.microbatches):
            for s, n in enumerate(spec.stage_nodes):
                per_node[n] += [(p, m, s, "F"), (p, m, s, "B")]
    best = (math.inf, math.inf)
    for orders in itertools.product(*[list(node_sequences(t)) for t in per_node]):
        mk = simple_times(problem, list(orders))
        if mk is not None:
            best = min(best, (mk, simple_peak(problem, list(orders))))
    return best


def random_problem(rng: np.random.Generator) -> dict:
    nodes = int(rng.integers(1, 5))
    pipes = []
    for i in range(int(rng.integers(1, 4))):
        S = int(rng.integers(1, 5))
        pipes.append({
            "name": f"p{i}", "stage_nodes": rng.integers(0, nodes, S).tolist(),
            "microbatches": int(rng.integers(1, 6)),
            "fwd": rng.integers(1, 4, S).astype(float).tolist(),
            "bwd": rng.integers(1, 6, S).astype(float).tolist(),
            "mem": rng.integers(0, 3, S).astype(float).tolist(),
        })
    return {"nodes": nodes, "pipelines": pipes}


def random_valid_schedule(table: TaskTable, rng: np.random.Generator) -> Schedule:
    """Per-node orders from a random topological order of the chains."""
    ready = [int(t) for t in np.flatnonzero(table.dep < 0)]
    orders = [[] for _ in range(table.num_nodes)]
    while ready:
        t = ready.pop(int(rng.integers(len(ready))))
        orders[table.node[t]].append(t)
        if table.succ[t] >= 0:
            ready.append(int(table.succ[t]))
    return Schedule.from_node_orders(orders)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("problem", [
    actor_critic_problem(4, 1, 6),
    actor_critic_problem(4, 2, 4),
    {"nodes": 3, "pipelines": [  # per-stage times, two stages of one pipeline on one node
        {"name": "actor", "stage_nodes": [0, 1, 2, 0], "microbatches": 5, "fwd": [1, 2, 1, 1.5],
         "bwd": [2, 3, 2, 3], "mem": [1, 2, 1, 1]},
        {"name": "critic", "stage_nodes": [2, 1], "microbatches": 3, "fwd": 1, "bwd": [2, 2.5], "mem": 0.5},
        {"name": "reward", "stage_nodes": [1], "microbatches": 2, "fwd": 0.5, "bwd": 0.5}]},
])
def test_result_format_is_valid(problem):
    for cap in (None, "1f1b"):
        res = solve(problem, time_limit=3, workers=1, config=FAST, memory_cap=cap)
        out = res.to_dict()
        check_result(problem, out)
        if cap == "1f1b":
            assert out["peak_memory"] <= res.side_by_side_peak + 1e-9
        assert out["makespan"] <= out["baseline"]["sequential_1f1b"]["makespan"]
        assert out["memory_lower_bound"] <= out["peak_memory"] + 1e-9


def test_one_f_one_b_matches_closed_form():
    for S, M, f, b in [(1, 1, 1, 2), (4, 8, 1, 2), (4, 2, 1.5, 2.5), (8, 3, 2, 4), (5, 16, 1, 1)]:
        prob = FusedProblem.from_dict({"nodes": S, "pipelines": [
            {"name": "a", "stage_nodes": list(range(S)), "microbatches": M, "fwd": f, "bwd": b}]})
        table = TaskTable.build(prob)
        timing = time_schedule(table, one_f_one_b(prob, table))
        assert timing.makespan == pytest.approx((M + S - 1) * (f + b))
        # stage s holds min(S - s, M) micro-batches at its peak
        assert timing.node_peaks.tolist() == [min(S - s, M) for s in range(S)]
        assert lower_bound(prob).value == pytest.approx((M + S - 1) * (f + b))  # 1F1B is optimal here


def test_sequential_1f1b_runs_pipelines_one_after_the_other():
    prob = FusedProblem.from_dict(actor_critic_problem(4, 1, 4))
    table = TaskTable.build(prob)
    timing = time_schedule(table, one_f_one_b(prob, table))
    actor = [t for t in range(table.num_tasks) if table.pipeline[t] == 0]
    critic = [t for t in range(table.num_tasks) if table.pipeline[t] == 1]
    for n in range(prob.nodes):  # on every node all actor work precedes all critic work
        last_actor = max(timing.end[t] for t in actor if table.node[t] == n)
        first_critic = min(timing.start[t] for t in critic if table.node[t] == n)
        assert first_critic >= last_actor
    assert timing.makespan <= 2 * (4 + 4 - 1) * 3  # no worse than two 1F1B back to back


def test_lower_bound_holds_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(60):
        prob = FusedProblem.from_dict(random_problem(rng))
        table = TaskTable.build(prob)
        plain = lower_bound(prob).value
        starts = [s for _, s in start_candidates(prob, table, plain)]
        schedules = [one_f_one_b(prob, table)] + starts[::20] + starts[-2:]
        schedules += [random_valid_schedule(table, rng) for _ in range(8)]
        for sched in schedules:
            timing = time_schedule(table, sched)
            assert plain <= timing.makespan + 1e-9
            # the memory-aware bound holds for every schedule within its peak
            assert lower_bound(prob, timing.peak_memory).value <= timing.makespan + 1e-9


def test_memory_bound_is_tighter_where_memory_binds():
    prob = FusedProblem.from_dict(actor_critic_problem(16, 1, 64))
    table = TaskTable.build(prob)
    cap = side_by_side_peak(prob, table)
    assert cap == 17
    assert lower_bound(prob).value == 405
    assert lower_bound(prob, cap).value == 411  # derivation in pipeline_bounds' docstring


@pytest.mark.parametrize("problem,cap", [
    ({"nodes": 2, "pipelines": [
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 2, "fwd": 1, "bwd": 2},
        {"name": "critic", "stage_nodes": [1, 0], "microbatches": 1, "fwd": 1, "bwd": 2}]}, math.inf),
    ({"nodes": 2, "pipelines": [
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 2, "fwd": [1, 2], "bwd": [3, 2]},
        {"name": "critic", "stage_nodes": [1, 0], "microbatches": 1, "fwd": [2, 1], "bwd": [1, 3]}]}, math.inf),
    ({"nodes": 2, "pipelines": [
        {"name": "actor", "stage_nodes": [0, 1, 0], "microbatches": 2, "fwd": 1, "bwd": 2}]}, math.inf),
    ({"nodes": 2, "pipelines": [  # the cap costs time: optimum 10, 9 without it
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 2, "fwd": 1, "bwd": 2},
        {"name": "critic", "stage_nodes": [1, 0], "microbatches": 1, "fwd": 1, "bwd": 2}]}, 2.0),
    ({"nodes": 2, "pipelines": [  # one micro-batch per node at a time: optimum 14
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 2, "fwd": 1, "bwd": 2},
        {"name": "critic", "stage_nodes": [1, 0], "microbatches": 1, "fwd": 1, "bwd": 1}]}, 1.0),
])
def test_search_finds_the_brute_force_optimum(problem, cap):
    prob = FusedProblem.from_dict(problem)
    best = brute_force(prob, cap)
    assert lower_bound(prob, cap).value <= best
    # runs until the bound (where it is the optimum) or for 40 short annealing runs
    res = solve(prob, time_limit=20, workers=1, memory_cap=cap,
                config=SearchConfig(max_runs=40, min_run_iters=2_000))
    assert res.makespan == pytest.approx(best)
    assert res.peak_memory <= cap
    check_result(problem, res.to_dict())


def test_fifo_relabel_never_delays():
    rng = np.random.default_rng(1)
    for _ in range(30):
        prob = FusedProblem.from_dict(random_problem(rng))
        table = TaskTable.build(prob)
        sched = random_valid_schedule(table, rng)
        before = time_schedule(table, sched)
        after = time_schedule(table, fifo_relabel(table, sched))
        assert after.makespan <= before.makespan + 1e-9
        assert after.peak_memory == pytest.approx(before.peak_memory)


def test_deadlocked_order_is_detected():
    prob = FusedProblem.from_dict({"nodes": 2, "pipelines": [
        {"name": "a", "stage_nodes": [0, 1], "microbatches": 1, "fwd": 1, "bwd": 1}]})
    table = TaskTable.build(prob)
    # node 0 runs its backward before its forward
    bad = Schedule.from_node_orders([[3, 0], [1, 2]])
    with pytest.raises(ValueError, match="deadlock"):
        time_schedule(table, bad)
    order, pos = bad.order, bad.positions()
    start, end = np.zeros(4), np.zeros(4)
    assert ke.evaluate(order, pos, bad.node_ptr, table.dur, table.node, table.dep, table.succ, start,
                       end) == ke.DEADLOCK


def test_incremental_moves_keep_times_and_memory_exact():
    """After many accepted and rejected incremental moves the times equal a full evaluation."""
    prob = FusedProblem.from_dict(actor_critic_problem(8, 2, 16))
    table = TaskTable.build(prob)
    cap = side_by_side_peak(prob, table)
    sched = min((time_schedule(table, s) for _, s in start_candidates(prob, table, 0.0, cap)
                 if time_schedule(table, s).peak_memory <= cap), key=lambda t: t.makespan).schedule
    T, ptr = table.num_tasks, sched.node_ptr
    order, pos = sched.order.copy(), sched.positions()
    start, end = np.zeros(T), np.zeros(T)
    mk = ke.evaluate(order, pos, ptr, table.dur, table.node, table.dep, table.succ, start, end)
    prefix, peaks = np.zeros(T), np.zeros(table.num_nodes)
    ke.node_peaks(order, ptr, table.memd, prefix, peaks)
    ke.seed_rng(3)
    state = np.array([mk, mk, 2.0, 0.0])
    best = order.copy()
    ke.anneal_makespan(order, pos, ptr, table.dur, table.node, table.dep, table.succ, table.memd, table.klass,
                       start, end, prefix, best, state, 20_000, 1.0, cap, 0.0, 1e-9, 0.2)
    s2, e2, pref2, peaks2 = np.zeros(T), np.zeros(T), np.zeros(T), np.zeros(table.num_nodes)
    pos2 = np.empty(T, np.int64)
    pos2[order] = np.arange(T)
    assert np.array_equal(pos, pos2)
    assert ke.evaluate(order, pos2, ptr, table.dur, table.node, table.dep, table.succ, s2, e2) == state[0]
    np.testing.assert_array_equal(start, s2)
    np.testing.assert_array_equal(end, e2)
    assert ke.node_peaks(order, ptr, table.memd, pref2, peaks2) <= cap
    np.testing.assert_allclose(prefix, pref2)
    # the memory phase: same check, and it never loses makespan
    mem_state = np.array([ke.memory_energy(peaks2, 0.5)] * 2 + [1.0, 0.0, peaks2.max()])
    ke.anneal_memory_moves(order, pos, ptr, table.dur, table.node, table.dep, table.succ, table.memd,
                           table.klass, start, end, pref2, peaks2, best, mem_state, 20_000, 1.0, state[0],
                           0.5, 1e-9, 0.5)
    assert ke.evaluate(order, pos, ptr, table.dur, table.node, table.dep, table.succ, s2, e2) <= state[0]
    np.testing.assert_array_equal(start, s2)
    pref3, peaks3 = np.zeros(T), np.zeros(table.num_nodes)
    ke.node_peaks(order, ptr, table.memd, pref3, peaks3)
    np.testing.assert_allclose(pref2, pref3)
    np.testing.assert_allclose(peaks2, peaks3)


def test_search_is_deterministic_for_a_seed():
    problem = actor_critic_problem(4, 2, 8)
    a = solve(problem, time_limit=30, seed=7, workers=1, config=FAST).to_dict()["tasks"]
    b = solve(problem, time_limit=30, seed=7, workers=1, config=FAST).to_dict()["tasks"]
    assert a == b


def test_two_workers_use_both_cores():
    res = solve(actor_critic_problem(8, 2, 16), time_limit=4, workers=2, config=FAST)
    assert len(res.outcomes) == 2
    assert len({o.seed for o in res.outcomes}) == 2
    assert res.makespan == min(o.makespan for o in res.outcomes)


def test_published_families_reach_the_bound_quickly():
    """1:1 instances: the makespan bound is reached, then the memory phase gets the peak
    down to 1F1B side by side or to the memory bound at that makespan."""
    for S, M in [(8, 16), (16, 32)]:
        res = solve(actor_critic_problem(S, 1, M), time_limit=5, workers=1, config=FAST)
        assert res.makespan == res.lower_bound.value
        assert res.peak_memory <= max(res.side_by_side_peak, math.ceil(res.memory_lower_bound - 1e-6))


@pytest.mark.parametrize("data,message", [
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 2], "microbatches": 1, "fwd": 1, "bwd": 1}]},
     r"stage_nodes\[1\]: stage 1 is mapped to node 2, but nodes are 0..1"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 0, "fwd": 1, "bwd": 1}]},
     r"microbatches: must be at least 1, got 0"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 2, "fwd": [1], "bwd": 1}]},
     r"fwd: expected 2 values \(one per stage\), got 1"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 2, "fwd": 1, "bwd": [1, -2]}]},
     r"bwd\[1\]: must be positive, got -2"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 2, "fwd": 0, "bwd": 1}]},
     r"fwd: must be positive, got 0"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 2, "fwd": 1, "bwd": 1, "mem": -1}]},
     r"mem: must be non-negative"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 2, "fwd": float("nan"), "bwd": 1}]},
     r"fwd: expected a finite number"),
    ({"nodes": 0, "pipelines": []}, r"nodes: must be at least 1, got 0"),
    ({"nodes": 2, "pipelines": []}, r"pipelines: expected a non-empty list"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [], "microbatches": 1, "fwd": 1, "bwd": 1}]},
     r"stage_nodes: expected a non-empty list"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0], "microbatch": 1, "fwd": 1, "bwd": 1}]},
     r"unknown field\(s\) \['microbatch'\]"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0], "fwd": 1, "bwd": 1}]}, r"missing field 'microbatches'"),
    ({"nodes": 2, "pipelines": [{"name": "a", "stage_nodes": [0], "microbatches": 1, "fwd": 1, "bwd": 1},
                                {"name": "a", "stage_nodes": [1], "microbatches": 1, "fwd": 1, "bwd": 1}]},
     r"duplicate name"),
    ([1, 2], r"expected a JSON object"),
])
def test_bad_problems_are_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        FusedProblem.from_dict(data)


def test_memory_cap_below_one_microbatch_is_an_error():
    with pytest.raises(ValueError, match="no schedule fits"):
        solve(actor_critic_problem(4, 1, 4), time_limit=1, memory_cap=0.5, workers=1)


def test_tight_memory_cap_is_honoured():
    res = solve(actor_critic_problem(4, 1, 6), time_limit=2, memory_cap=2, workers=1, config=FAST)
    assert res.peak_memory <= 2
    check_result(actor_critic_problem(4, 1, 6), res.to_dict())


def test_pure_python_fallback_without_numba(tmp_path):
    """The kernels run (slowly) as plain Python where numba is missing."""
    script = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # make `import numba` fail
        from fusedrl.kernels import schedule_eval as ke
        assert not ke.HAVE_NUMBA
        from fusedrl.scheduler.pipeline_schedule import solve
        from fusedrl.scheduler.pipeline_search import SearchConfig
        from fusedrl.scheduler.pipeline_families import actor_critic_problem
        cfg = SearchConfig(max_runs=1, min_run_iters=300, run_iters_per_task=1, chunk_iters=100,
                           memory_iters_per_task=2)
        res = solve(actor_critic_problem(2, 1, 2), time_limit=20, workers=1, config=cfg)
        print(res.makespan, res.lower_bound.value)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    makespan, bound = map(float, out.stdout.split())
    assert bound <= makespan


# ------------------------------------------------- lexicographic objective (issue 15)


@pytest.mark.parametrize("problem", [
    {"nodes": 2, "pipelines": [  # 8100 order pairs each
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 2, "fwd": 1, "bwd": 2, "mem": 2},
        {"name": "critic", "stage_nodes": [1, 0], "microbatches": 1, "fwd": 1, "bwd": 2, "mem": 1}]},
    {"nodes": 2, "pipelines": [
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 2, "fwd": [1, 2], "bwd": [3, 2], "mem": 3},
        {"name": "critic", "stage_nodes": [1, 0], "microbatches": 1, "fwd": [2, 1], "bwd": [1, 3], "mem": 1}]},
    {"nodes": 2, "pipelines": [
        {"name": "actor", "stage_nodes": [0, 1], "microbatches": 3, "fwd": 1, "bwd": 2, "mem": 1}]},
])
def test_default_objective_is_makespan_then_memory(problem):
    """The default search finds the brute-force lexicographic optimum: the least
    makespan, then the least peak memory among the schedules that short."""
    prob = FusedProblem.from_dict(problem)
    best_mk, best_peak = brute_force_lexicographic(prob)
    res = solve(prob, time_limit=20, workers=1, config=SearchConfig(max_runs=20, min_run_iters=2_000))
    assert res.makespan == pytest.approx(best_mk)
    assert res.peak_memory == pytest.approx(best_peak)
    assert res.memory_lower_bound <= best_peak + 1e-9
    check_result(problem, res.to_dict())


def test_memory_phase_never_gives_back_makespan():
    prob = FusedProblem.from_dict(published_instance())
    res = solve(prob, time_limit=6, workers=1, config=FAST)
    o = res.outcomes[0]
    assert res.makespan <= min(m for _, m in o.history) + 1e-9  # phase 1's best
    capped = solve(prob, time_limit=6, workers=1, config=FAST, memory_cap="1f1b")
    assert capped.peak_memory <= capped.side_by_side_peak
    assert res.makespan <= capped.makespan  # no cap: never longer than under one


def published_instance() -> dict:
    from fusedrl.scheduler.pipeline_families import FamilyInstance

    return FamilyInstance(nodes=8, critics=2, microbatches=8, actor_fwd=2, critic_fwd=3,
                          actor_mem=1, critic_mem=3).problem()


def test_memory_lower_bound_holds_on_random_problems():
    rng = np.random.default_rng(3)
    for _ in range(40):
        prob = FusedProblem.from_dict(random_problem(rng))
        table = TaskTable.build(prob)
        plain = lower_bound(prob).value
        for sched in [s for _, s in start_candidates(prob, table, plain)][::15] + [
                random_valid_schedule(table, rng) for _ in range(6)]:
            timing = time_schedule(table, sched)
            assert memory_lower_bound(prob, timing.makespan) <= timing.peak_memory + 1e-9


def test_memory_lower_bound_holds_against_brute_force():
    """On tiny random problems, for every makespan some order reaches, the bound is at
    most the least peak of all orders that short (exhaustive)."""
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(300):
        nodes = int(rng.integers(1, 3))
        pipes = [{"name": f"p{i}", "stage_nodes": rng.integers(0, nodes, S).tolist(),
                  "microbatches": int(rng.integers(1, 4)), "fwd": rng.integers(1, 4, S).tolist(),
                  "bwd": rng.integers(1, 5, S).tolist(), "mem": rng.integers(0, 4, S).tolist()}
                 for i, S in enumerate(rng.integers(1, 4, int(rng.integers(1, 3))).tolist())]
        prob = FusedProblem.from_dict({"nodes": nodes, "pipelines": pipes})
        per_node = [[] for _ in range(nodes)]
        for p, spec in enumerate(prob.pipelines):
            for m in range(spec.microbatches):
                for s, n in enumerate(spec.stage_nodes):
                    per_node[n] += [(p, m, s, "F"), (p, m, s, "B")]
        if max(len(t) for t in per_node) > 8:
            continue
        seqs = [list(node_sequences(t)) for t in per_node]
        if math.prod(len(q) for q in seqs) > 5_000:
            continue
        least = {}  # makespan -> least peak of the orders that long
        for orders in itertools.product(*seqs):
            mk = simple_times(prob, list(orders))
            if mk is not None:
                least[mk] = min(least.get(mk, math.inf), simple_peak(prob, list(orders)))
        best = math.inf
        for mk in sorted(least):
            best = min(best, least[mk])
            assert memory_lower_bound(prob, mk) <= best + 1e-9, (prob.to_dict(), mk, best)
            checked += 1
    assert checked > 200


def test_memory_lower_bound_counts_the_work_a_node_must_have_started():
    """8-stage actor (f=1, b=2, 64 micro-batches, memory 3) and a reversed critic (f=2,
    b=4, memory 1) at the bound makespan 588: a node that may idle for only a few units
    must have started so much work by the time its backwards are released that it holds
    more than the forced-forward count alone shows (the previous bound, 5)."""
    from fusedrl.scheduler.pipeline_families import FamilyInstance

    prob = FusedProblem.from_dict(FamilyInstance(8, 1, 64, 1, 2, 3, 1).problem())
    assert lower_bound(prob).value == 588
    assert memory_lower_bound(prob, 588) >= 10


def test_memory_lower_bound_is_tight_where_memory_binds():
    """16-stage actor and reversed critic, 64 micro-batches: 17 held per node allow no
    schedule shorter than 411 (the memory bound), so a schedule of 405 needs more."""
    prob = FusedProblem.from_dict(actor_critic_problem(16, 1, 64))
    assert memory_lower_bound(prob, 411) <= 17
    assert memory_lower_bound(prob, 405) > 17


def test_memory_cap_option_and_gap_reason():
    prob = actor_critic_problem(16, 1, 64)
    assert solve(prob, time_limit=0, workers=1, config=FAST).to_dict()["bound_gap_reason"] is None
    capped = solve(prob, time_limit=0, workers=1, config=FAST, memory_cap="1f1b").to_dict()
    assert capped["lower_bound"] == 411
    assert "memory cap 17" in capped["bound_gap_reason"]
    with pytest.raises(ValueError, match="memory_cap: expected a number or '1f1b', got 'lots'"):
        solve(prob, time_limit=0, workers=1, memory_cap="lots")


def test_family_generator_covers_the_published_family():
    from fusedrl.scheduler.pipeline_families import family_instances

    insts = family_instances(24, seed=0)
    assert insts == family_instances(24, seed=0)  # reproducible
    assert {(i.nodes, i.critics) for i in insts} == {(8, 1), (8, 2), (16, 1), (16, 2)}
    for i in insts:
        prob = FusedProblem.from_dict(i.problem())
        assert 4 <= i.microbatches <= 64 and i.actor_mem != i.critic_mem
        assert len(prob.pipelines) == 1 + i.critics
        for spec in prob.pipelines[1:]:  # K critics of N/K stages, reversed over their share
            assert spec.num_stages * i.critics == i.nodes
            assert list(spec.stage_nodes) == sorted(spec.stage_nodes, reverse=True)
            assert spec.microbatches * i.critics == i.microbatches
        for spec in prob.pipelines:
            assert all(b == 2 * f and f == int(f) for f, b in zip(spec.fwd, spec.bwd))


def test_peak_moves_keep_times_and_memory_exact():
    """anneal_memory_moves: after any number of moves the incremental times, prefix sums
    and node peaks equal a full re-evaluation, and the makespan never exceeds the limit."""
    prob = FusedProblem.from_dict(published_instance())
    table = TaskTable.build(prob)
    sched = fifo_relabel(table, start_candidates(prob, table, 0.0)[0][1])
    order, ptr = sched.order.copy(), sched.node_ptr
    T = table.num_tasks
    pos = np.empty(T, np.int64)
    pos[order] = np.arange(T)
    start, end, prefix, peaks = np.zeros(T), np.zeros(T), np.zeros(T), np.zeros(table.num_nodes)
    mk = ke.evaluate(order, pos, ptr, table.dur, table.node, table.dep, table.succ, start, end)
    peak = ke.node_peaks(order, ptr, table.memd, prefix, peaks)
    best = order.copy()
    state = np.array([ke.memory_energy(peaks, 0.5)] * 2 + [1.0, 0.0, peak])
    ke.seed_rng(5)
    ke.anneal_memory_moves(order, pos, ptr, table.dur, table.node, table.dep, table.succ, table.memd,
                           table.klass, start, end, prefix, peaks, best, state, 20_000, 0.9999, mk, 0.5,
                           1e-9, 0.5)
    s2, e2, pref2, peaks2 = np.zeros(T), np.zeros(T), np.zeros(T), np.zeros(table.num_nodes)
    assert ke.evaluate(order, pos, ptr, table.dur, table.node, table.dep, table.succ, s2, e2) <= mk + 1e-9
    np.testing.assert_array_equal(start, s2)
    np.testing.assert_array_equal(end, e2)
    ke.node_peaks(order, ptr, table.memd, pref2, peaks2)
    np.testing.assert_allclose(prefix, pref2)
    np.testing.assert_allclose(peaks, peaks2)
    assert state[4] <= peak  # the best peak seen never rises
    pb = np.empty(T, np.int64)
    pb[best] = np.arange(T)
    assert ke.evaluate(best, pb, ptr, table.dur, table.node, table.dep, table.succ, s2, e2) <= mk + 1e-9
    assert ke.node_peaks(best, ptr, table.memd, pref2, peaks2) == pytest.approx(state[4])


def test_no_time_gives_the_best_start():
    """``time_limit=0`` (the plan evaluator's default) builds every start and returns the
    shortest, as before the starts got a share of the time."""
    prob = FusedProblem.from_dict(published_instance())
    table = TaskTable.build(prob)
    best = min(time_schedule(table, s).makespan for _, s in start_candidates(prob, table, lower_bound(prob).value))
    assert solve(prob, time_limit=0, workers=1).makespan == best


def test_adjacent_swap_annealing_keeps_times_exact():
    """anneal_adjacent_swaps (the reference search's makespan moves): the incremental
    times equal a full re-evaluation and the best order's makespan is the one reported."""
    prob = FusedProblem.from_dict(published_instance())
    table = TaskTable.build(prob)
    sched = fifo_relabel(table, greedy_fused(prob, table, "ready", inflight_slack=None))
    order, ptr = sched.order.copy(), sched.node_ptr
    T = table.num_tasks
    pos = np.empty(T, np.int64)
    pos[order] = np.arange(T)
    start, end = np.zeros(T), np.zeros(T)
    mk = ke.evaluate(order, pos, ptr, table.dur, table.node, table.dep, table.succ, start, end)
    best = order.copy()
    state = np.array([mk, mk, 2.0, 0.0])
    ke.seed_rng(3)
    ke.anneal_adjacent_swaps(order, pos, ptr, table.dur, table.node, table.dep, table.succ, start, end, best,
                             state, 50_000, 0.9999, 0.0, 1e-9)
    assert state[3] == 50_000 and state[1] <= mk
    s2, e2 = np.zeros(T), np.zeros(T)
    assert ke.evaluate(order, pos, ptr, table.dur, table.node, table.dep, table.succ, s2, e2) == state[0]
    np.testing.assert_array_equal(start, s2)
    pb = np.empty(T, np.int64)
    pb[best] = np.arange(T)
    assert ke.evaluate(best, pb, ptr, table.dur, table.node, table.dep, table.succ, s2, e2) == state[1]


def test_reference_search_and_solve_against_it():
    """The reimplemented RLHFuse search starts from the paper's greedy and never ends
    worse than it; the default search is at or below it in makespan and memory."""
    from fusedrl.scheduler.pipeline_rlhfuse import reference_search

    prob = FusedProblem.from_dict(published_instance())
    table = TaskTable.build(prob)
    greedy = time_schedule(table, greedy_fused(prob, table, "ready", inflight_slack=None))
    ref = reference_search(prob, time_limit=3, workers=1)
    assert (ref.start_makespan, ref.start_peak_memory) == (greedy.makespan, greedy.peak_memory)
    assert ref.makespan <= ref.start_makespan and ref.makespan >= lower_bound(prob).value
    assert ref.makespan_moves > 0 and ref.memory_moves > 0
    res = solve(prob, time_limit=3, workers=1)
    assert res.makespan <= ref.makespan and res.peak_memory <= ref.peak_memory
