"""Tests of the reallocation planner (fusedrl.realloc.plan).

The main test is property-based: for random small models and random pairs of
placements (overlapping, identical or disjoint device sets, different world sizes)
it executes the plan in numpy -- copying regions from source-device shards into
destination-device shards -- and checks the contract of docs/design.md.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedrl.layout import ParallelLayout, Placement
from fusedrl.models import PRESETS, ModelConfig
from fusedrl.models import sharding as sh
from fusedrl.realloc import ReallocPlan, Transfer, minimum_bytes, plan_realloc

MAX_DEVICES = 8
DEVICE_POOL = 12  # device ids drawn from 0..11


# ---- strategies --------------------------------------------------------------------------


@st.composite
def models(draw) -> ModelConfig:
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4]))
    hidden = draw(st.sampled_from([8, 12, heads * head_dim]))
    return ModelConfig(
        vocab_size=24 * draw(st.integers(1, 2)),
        hidden_size=hidden,
        intermediate_size=24 * draw(st.integers(1, 2)),
        num_layers=draw(st.integers(1, 8)),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
    )


def _fits(config: ModelConfig, layout: ParallelLayout) -> bool:
    try:
        layout.check_model(config)
    except ValueError:
        return False
    return True


@st.composite
def layouts(draw, config: ModelConfig) -> ParallelLayout:
    tps = [t for t in (1, 2, 3, 4, 6, 8) if _fits(config, ParallelLayout(1, t, 1))]
    tp = draw(st.sampled_from(tps))
    pp = draw(st.integers(1, min(config.num_layers, MAX_DEVICES // tp)))
    dp = draw(st.integers(1, MAX_DEVICES // (tp * pp)))
    return ParallelLayout(dp, tp, pp)


@st.composite
def problems(draw):
    config = draw(models())
    src_layout, dst_layout = draw(layouts(config)), draw(layouts(config))
    src_devices = draw(st.permutations(range(DEVICE_POOL)))[: src_layout.world_size]
    others = [d for d in range(DEVICE_POOL + MAX_DEVICES) if d not in src_devices]
    mode = draw(st.sampled_from(["random", "shared", "aligned", "disjoint"]))
    if mode == "random":
        dst_devices = draw(st.permutations(range(DEVICE_POOL)))
    elif mode == "shared":  # the source devices first (identical sets when sizes match)
        dst_devices = draw(st.permutations(src_devices)) + draw(st.permutations(others))
    elif mode == "aligned":  # same device order: rank r of both on the same device
        dst_devices = list(src_devices) + others
    else:
        dst_devices = draw(st.permutations(others))
    dst_devices = list(dst_devices)[: dst_layout.world_size]
    head = draw(st.sampled_from(["lm", "value"]))
    return config, Placement(src_layout, src_devices), Placement(dst_layout, dst_devices), head


# ---- plan execution in numpy ---------------------------------------------------------------


def _full_params(config: ModelConfig, head: str) -> dict[str, np.ndarray]:
    """Every element of every parameter gets a distinct value."""
    out, offset = {}, 0
    for name, shape in sh.param_shapes(config, head).items():
        n = int(np.prod(shape))
        out[name] = np.arange(offset, offset + n, dtype=np.int64).reshape(shape)
        offset += n
    return out


def _regions_by_device(config, placement: Placement, head) -> dict[int, dict]:
    return {dev: sh.shard_regions(config, placement.layout, r, head)
            for r, dev in enumerate(placement.devices)}


def execute_and_check(plan: ReallocPlan) -> None:
    """Run ``plan`` on numpy shards and assert the planner contract."""
    config, head = plan.config, plan.head
    full = _full_params(config, head)
    src_regions = _regions_by_device(config, plan.src, head)
    dst_regions = _regions_by_device(config, plan.dst, head)
    src_store = {dev: {n: full[n][sh.region_slices(r)].copy() for n, r in regs.items()}
                 for dev, regs in src_regions.items()}
    dst_store = {dev: {n: np.full(sh.region_shape(r), -1, dtype=np.int64)
                       for n, r in regs.items()} for dev, regs in dst_regions.items()}
    count = {dev: {n: np.zeros(sh.region_shape(r), dtype=np.int64) for n, r in regs.items()}
             for dev, regs in dst_regions.items()}

    for t in plan.transfers:
        assert isinstance(t, Transfer)
        # The sender holds what it sends under the source placement.
        assert t.param in src_regions.get(t.src, {}), t
        src_region = src_regions[t.src][t.param]
        assert sh.contains(src_region, t.region), t
        # The receiver needs it under the destination placement.
        assert t.param in dst_regions.get(t.dst, {}), t
        dst_region = dst_regions[t.dst][t.param]
        assert sh.contains(dst_region, t.region), t
        if t.src != t.dst:
            # No byte the destination device already held crosses devices.
            held = src_regions.get(t.dst, {}).get(t.param)
            assert held is None or sh.intersect(held, t.region) is None, t
        piece = src_store[t.src][t.param][sh.local_slices(t.region, src_region)]
        local = sh.local_slices(t.region, dst_region)
        dst_store[t.dst][t.param][local] = piece
        count[t.dst][t.param][local] += 1

    # Every destination shard is complete and exact, each element written once.
    for dev, regs in dst_regions.items():
        for name, region in regs.items():
            assert (count[dev][name] == 1).all(), (dev, name)
            np.testing.assert_array_equal(dst_store[dev][name],
                                          full[name][sh.region_slices(region)])


def independent_minimum(plan: ReallocPlan) -> int:
    """Bytes the destination devices need and did not hold, by element masks."""
    config, head = plan.config, plan.head
    shapes = sh.param_shapes(config, head)
    src_regions = _regions_by_device(config, plan.src, head)
    missing = 0
    for dev, regs in _regions_by_device(config, plan.dst, head).items():
        for name, region in regs.items():
            need = np.zeros(shapes[name], dtype=bool)
            need[sh.region_slices(region)] = True
            held = src_regions.get(dev, {}).get(name)
            if held is not None:
                need[sh.region_slices(held)] = False
            missing += int(need.sum())
    return missing * plan.dtype_bytes


def check_balance(plan: ReallocPlan) -> None:
    """Each distinct piece has one sender; within a group of source dp replicas the
    busiest sender carries at most an even share of the group's load plus one piece."""
    senders: dict[tuple, set[int]] = defaultdict(set)
    for t in plan.remote_transfers:
        senders[(t.param, t.region)].add(t.src)
    assert all(len(s) == 1 for s in senders.values())
    groups = plan.broadcast_groups()
    if not groups:
        return
    load = plan.broadcast_bytes_per_sender
    max_piece = max(g.numel for g in groups) * plan.dtype_bytes
    layout = plan.src.layout
    for dev, bytes_sent in load.items():
        c = layout.coord(plan.src.rank_of(dev))
        replicas = [plan.src.devices[layout.rank(d, c.tp, c.pp)] for d in range(layout.dp)]
        group_load = sum(load.get(r, 0) for r in replicas)
        assert bytes_sent <= group_load / layout.dp + max_piece, (dev, load)


# ---- property tests ------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([1, 2, 4]))
def test_plan_contract_on_random_placements(problem, dtype_bytes: int) -> None:
    config, src, dst, head = problem
    plan = plan_realloc(config, src, dst, head=head, dtype_bytes=dtype_bytes)
    execute_and_check(plan)
    minimum = independent_minimum(plan)
    assert plan.bytes_moved == minimum == plan.bytes_minimum
    assert minimum_bytes(config, src, dst, head, dtype_bytes) == minimum
    # Local copies whenever possible: local + moved = everything the destination needs.
    needed = sum(sh.region_numel(r) for regs in _regions_by_device(config, dst, head).values()
                 for r in regs.values()) * dtype_bytes
    assert plan.bytes_local + plan.bytes_moved == needed
    assert sum(plan.bytes_per_sender.values()) == plan.bytes_moved
    check_balance(plan)
    assert ReallocPlan.from_dict(json.loads(plan.to_json())) == plan


@settings(max_examples=60, deadline=None)
@given(problems())
def test_same_placement_moves_nothing(problem) -> None:
    config, src, _, head = problem
    plan = plan_realloc(config, src, src, head=head)
    assert plan.bytes_moved == 0 == plan.bytes_minimum
    assert all(t.is_local for t in plan.transfers)
    # One local copy per held parameter.
    regions = _regions_by_device(config, src, head)
    assert sorted((t.dst, t.param, t.region) for t in plan.transfers) == sorted(
        (dev, n, r) for dev, regs in regions.items() for n, r in regs.items())


@settings(max_examples=60, deadline=None)
@given(problems())
def test_disjoint_devices_move_whole_destination(problem) -> None:
    config, src, dst, head = problem
    others = [d for d in range(DEVICE_POOL + MAX_DEVICES) if d not in src.devices]
    dst = Placement(dst.layout, others[: dst.layout.world_size])
    plan = plan_realloc(config, src, dst, head=head)
    assert not plan.local_transfers
    per_replica = sum(int(np.prod(s)) for s in sh.param_shapes(config, head).values())
    # Each destination dp replica receives the model once (plus replicated copies
    # of norms/score and kv heads where tp > 1); never less than the model.
    assert plan.bytes_moved >= dst.layout.dp * per_replica * plan.dtype_bytes
    execute_and_check(plan)


# ---- examples ------------------------------------------------------------------------------

SMALL = PRESETS["small"]


def _model_bytes(config: ModelConfig, dtype_bytes: int = 4) -> int:
    return config.num_params() * dtype_bytes


def test_tp2pp2_to_dp4_on_same_devices() -> None:
    src, dst = Placement.parse("dp1tp2pp2@0-3"), Placement.parse("dp4tp1pp1@0-3")
    plan = plan_realloc(SMALL, src, dst)
    execute_and_check(plan)
    # Each device keeps its quarter-ish and receives the rest.
    held = sum(sh.region_numel(r) for rank in range(4)
               for r in sh.shard_regions(SMALL, src.layout, rank).values()) * 4
    assert plan.bytes_moved == 4 * _model_bytes(SMALL) - held
    # Every remote piece goes from one holder to every device that did not hold it:
    # three for split parameters, two for the norms (replicated over the 2 tp ranks).
    src_regions = _regions_by_device(SMALL, src, "lm")
    for g in plan.broadcast_groups():
        holders = {d for d, regs in src_regions.items() if regs.get(g.param) == g.region}
        assert g.src in holders and set(g.dsts) == {0, 1, 2, 3} - holders
        assert len(g.dsts) == (2 if sh.param_kind(g.param) == sh.REPLICATED else 3)


def test_dp2_to_tp2_on_same_devices_is_all_local() -> None:
    plan = plan_realloc(SMALL, Placement.parse("dp2tp1pp1@0-1"), Placement.parse("dp1tp2pp1@0-1"))
    assert plan.bytes_moved == 0 and plan.bytes_local > 0
    execute_and_check(plan)


def test_sending_spreads_over_source_replicas() -> None:
    model = _model_bytes(SMALL)
    one = plan_realloc(SMALL, Placement.parse("dp1tp1pp1@0"), Placement.parse("dp1tp1pp1@4"))
    assert one.bytes_per_sender == {0: model}  # one replica: it sends everything
    four = plan_realloc(SMALL, Placement.parse("dp4tp1pp1@0-3"), Placement.parse("dp1tp1pp1@4"))
    assert sorted(four.bytes_per_sender) == [0, 1, 2, 3]
    assert max(four.bytes_per_sender.values()) <= 0.3 * model
    assert four.bytes_moved == model
    # To several destination replicas: broadcast groups, still balanced per sender.
    many = plan_realloc(SMALL, Placement.parse("dp2tp1pp1@0-1"), Placement.parse("dp4tp1pp1@2-5"))
    assert {len(g.dsts) for g in many.broadcast_groups()} == {4}
    assert max(many.broadcast_bytes_per_sender.values()) <= 0.6 * model
    execute_and_check(many)


def test_world_sizes_may_differ() -> None:
    plan = plan_realloc(SMALL, Placement.parse("dp1tp1pp1@0"), Placement.parse("dp2tp2pp2@0-7"))
    execute_and_check(plan)
    back = plan_realloc(SMALL, Placement.parse("dp2tp2pp2@0-7"), Placement.parse("dp1tp1pp1@3"))
    execute_and_check(back)
    assert back.bytes_moved == back.bytes_minimum > 0


def test_tp_split_and_merge_with_kv_replication() -> None:
    config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                         num_heads=8, num_kv_heads=2)
    for s, d in [("dp1tp8pp1@0-7", "dp2tp2pp1@0,2,4,6"), ("dp2tp2pp1@0-3", "dp1tp8pp1@0-7"),
                 ("dp1tp4pp2@0-7", "dp1tp8pp1@7,6,5,4,3,2,1,0")]:
        plan = plan_realloc(config, Placement.parse(s), Placement.parse(d), head="value")
        execute_and_check(plan)
        assert plan.bytes_moved == independent_minimum(plan)


def test_bad_input_is_a_clear_error_before_planning() -> None:
    ok = Placement.parse("dp1tp1pp1@0")
    with pytest.raises(ValueError, match=r"destination placement dp1tp3pp1@0-2: tp=3"):
        plan_realloc(SMALL, ok, Placement.parse("dp1tp3pp1@0-2"))
    with pytest.raises(ValueError, match=r"source placement .*pp=9 is larger than num_layers=8"):
        plan_realloc(SMALL, Placement.parse("dp1tp1pp9@0-8"), ok)
    with pytest.raises(ValueError, match="uses device 4 but the cluster has 4 devices"):
        plan_realloc(SMALL, ok, Placement.parse("dp2tp1pp1@4,5"), num_devices=4)
    with pytest.raises(ValueError, match="dtype_bytes"):
        plan_realloc(SMALL, ok, ok, dtype_bytes=0)
    with pytest.raises(ValueError, match="head"):
        plan_realloc(SMALL, ok, ok, head="reward")


def test_plan_is_json_serialisable() -> None:
    plan = plan_realloc(PRESETS["tiny"], Placement.parse("dp1tp2pp2@0-3"),
                        Placement.parse("dp2tp1pp1@2,3"))
    d = json.loads(plan.to_json())
    assert d["bytes_moved"] == plan.bytes_moved == d["bytes_minimum"]
    assert d["src"] == "dp1tp2pp2@0-3" and d["dst"] == "dp2tp1pp1@2-3"
    assert len(d["transfers"]) == len(plan.transfers)
    assert ReallocPlan.from_dict(d) == plan
    assert "moved" in str(plan)
