"""The reallocation executor: schedule construction, and resharding on 4 gloo workers.

The multi-process cases run in one spawn of 4 workers (one thread each); every
destination shard is compared with ``shard_state_dict`` of the full random state
dict (the ground truth) after the executor filled it (NaN-initialised first).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from fusedrl.layout import Placement
from fusedrl.models.config import PRESETS
from fusedrl.models.sharding import intersect, region_numel, shard_regions
from fusedrl.realloc import ReallocExecutor, build_schedule, plan_realloc, split_region
from fusedrl.realloc.executor import is_contiguous_in
from fusedrl.realloc.local import ReallocJob, launch, run_jobs

TINY = PRESETS["tiny"]  # 4 heads, 2 kv heads, 4 layers

CASES = {
    "tp2pp2->dp4": ("dp1tp2pp2@0-3", "dp4tp1pp1@0-3", {}),
    "dp2->tp2": ("dp2tp1pp1@0-1", "dp1tp2pp1@0-1", {}),
    "dp2->tp2 disjoint": ("dp2tp1pp1@0-1", "dp1tp2pp1@2-3", {}),
    "tp2->pp2": ("dp1tp2pp1@0-1", "dp1tp1pp2@0-1", {}),
    "disjoint tp2->dp2": ("dp1tp2pp1@0-1", "dp2tp1pp1@2-3", {}),
    "gqa tp4 from dp2tp2": ("dp2tp2pp1@0-3", "dp1tp4pp1@0-3", {}),
    "gqa tp4 to pp2dp2": ("dp1tp4pp1@0-3", "dp2tp1pp2@3,2,1,0", {}),
    "identical": ("dp2tp2pp1@0-3", "dp2tp2pp1@0-3", {}),
    # 1000 B < every weight matrix of tiny: parameters are cut into several messages.
    "small bucket": ("dp1tp2pp2@0-3", "dp4tp1pp1@0-3", {"bucket_bytes": 1000, "inflight": 2}),
    # pieces of >= 1 KiB contiguous on both ends travel in place (no staging copy)
    "direct tp2pp2->dp4": ("dp1tp2pp2@0-3", "dp4tp1pp1@0-3", {"direct_min_bytes": 1024}),
    "direct gqa": ("dp1tp4pp1@0-3", "dp2tp2pp1@1,0,3,2", {"direct_min_bytes": 1024}),
    # shared-memory transport: same results, slots reused (small bucket, 2 in flight)
    "shm tp2pp2->dp4": ("dp1tp2pp2@0-3", "dp4tp1pp1@0-3", {"transport": "shm"}),
    "shm disjoint": ("dp1tp2pp1@0-1", "dp2tp1pp1@2-3", {"transport": "shm"}),
    "shm gqa small bucket": ("dp1tp4pp1@0-3", "dp2tp1pp2@3,2,1,0",
                             {"transport": "shm", "bucket_bytes": 1000, "inflight": 2}),
    # 200 B < one row (64 floats): rows are cut along dim 1 as well.
    "sub-row bucket": ("dp1tp2pp1@0-1", "dp1tp1pp2@2,0", {"bucket_bytes": 200}),
}


@pytest.fixture(scope="module")
def results():
    jobs = [ReallocJob("tiny", src, dst, weights="random", verify=True, seed=i, **kw)
            for i, (src, dst, kw) in enumerate(CASES.values())]
    per_rank = launch(run_jobs, 4, (jobs,), timeout=300)
    return {name: [per_rank[r][i] for r in range(4)] for i, name in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_every_destination_shard_exact(results, case):
    res = results[case]
    assert all(r["verified"] is True for r in res), case
    src, dst, _ = CASES[case]
    plan = plan_realloc(TINY, Placement.parse(src), Placement.parse(dst))
    assert res[0]["bytes_moved"] == plan.bytes_minimum
    # Each device received exactly what the plan routes to it across devices.
    for rank, r in enumerate(res):
        if r["device_stats"] is None:
            assert rank not in plan.src.devices and rank not in plan.dst.devices
            continue
        expected = sum(t.numel * 4 for t in plan.remote_transfers if t.dst == rank)
        assert r["device_stats"]["bytes_received"] == expected


def test_direct_messages_skip_staging(results):
    for case in ("direct tp2pp2->dp4", "direct gqa"):
        stats = [r["device_stats"] for r in results[case]]
        assert all(s["staged_messages"] < s["messages"] for s in stats), case
    packed = [r["device_stats"] for r in results["tp2pp2->dp4"]]
    assert all(s["staged_messages"] == s["messages"] for s in packed)


def test_small_bucket_splits_messages(results):
    many = results["small bucket"][0]["messages"]
    few = results["tp2pp2->dp4"][0]["messages"]
    assert many > few
    # With the default 32 MB bucket, one message per (sender, receivers) stream.
    plan = plan_realloc(TINY, Placement.parse("dp1tp2pp2@0-3"), Placement.parse("dp4tp1pp1@0-3"))
    assert few == len({(g.src, g.dsts) for g in plan.broadcast_groups()})
    assert results["identical"][0]["messages"] == 0


# ---------------------------------------------------------------- pure scheduling


@pytest.mark.parametrize("cap", [1, 7, 64, 100, 4096, 10**9])
def test_split_region_tiles_in_row_major_order(cap):
    region = ((3, 11), (5, 69))
    parts = split_region(region, cap)
    assert all(region_numel(p) <= cap for p in parts)
    assert sum(region_numel(p) for p in parts) == region_numel(region)
    seen = torch.zeros(11, 69, dtype=torch.int64)
    order = []
    for p in parts:
        (a, b), (c, d) = p
        seen[a:b, c:d] += 1
        order.append((a, c))
    assert seen[3:11, 5:69].eq(1).all() and seen.sum() == region_numel(region)
    assert order == sorted(order)  # concatenation follows the parameter's row order


def test_split_region_rejects_empty_bucket():
    with pytest.raises(ValueError, match="positive"):
        split_region(((0, 4),), 0)


@pytest.mark.parametrize("src,dst", [(s, d) for s, d, _ in CASES.values()])
@pytest.mark.parametrize("bucket", [37, 1000, 1 << 20])
@pytest.mark.parametrize("direct_min", [None, 64])
def test_schedule_covers_remote_transfers_exactly(src, dst, bucket, direct_min):
    plan = plan_realloc(TINY, Placement.parse(src), Placement.parse(dst))
    schedule = build_schedule(plan, bucket, direct_min)
    assert [m.index for m in schedule] == list(range(len(schedule)))
    assert all(0 < m.numel <= bucket for m in schedule)
    got: dict[tuple[str, int], int] = defaultdict(int)
    for m in schedule:
        assert m.src not in m.dsts
        for c in m.chunks:
            for d in m.dsts:
                got[(c.param, d)] += c.numel
            # the sender holds every chunk it sends under the source placement
            held = shard_regions(TINY, plan.src.layout, plan.src.rank_of(m.src))[c.param]
            assert intersect(held, c.region) == c.region
    want: dict[tuple[str, int], int] = defaultdict(int)
    for t in plan.remote_transfers:
        want[(t.param, t.dst)] += t.numel
    assert dict(got) == dict(want)
    assert build_schedule(plan, bucket, direct_min) == schedule  # deterministic
    for m in schedule:
        if m.direct:  # in place on both ends: one contiguous chunk everywhere
            (c,) = m.chunks
            assert c.numel >= (direct_min or bucket)
            for dev, placement in [(m.src, plan.src)] + [(d, plan.dst) for d in m.dsts]:
                shard = shard_regions(TINY, placement.layout, placement.rank_of(dev))[c.param]
                full = torch.zeros([b - a for a, b in shard])
                view = full[tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(c.region, shard))]
                assert view.is_contiguous()


def test_large_contiguous_pieces_go_direct():
    plan = plan_realloc(TINY, Placement.parse("dp1tp2pp2@0-3"), Placement.parse("dp4tp1pp1@0-3"))
    packed = build_schedule(plan, 1 << 20)
    assert not any(m.direct for m in packed)
    mixed = build_schedule(plan, 1 << 20, direct_min_numel=1024)
    # column-parallel halves (q/gate/up/embed/head rows) are contiguous on both ends;
    # row-parallel halves (o_proj/down_proj columns) and norms are packed.
    direct = {c.param for m in mixed if m.direct for c in m.chunks}
    packed_params = {c.param for m in mixed if not m.direct for c in m.chunks}
    assert "model.layers.0.mlp.gate_proj.weight" in direct
    assert "model.layers.0.mlp.down_proj.weight" in packed_params
    assert "model.layers.0.mlp.down_proj.weight" not in direct


@pytest.mark.parametrize("region,shard,expected", [
    (((0, 4), (0, 8)), ((0, 8), (0, 8)), True),     # whole rows
    (((2, 3), (1, 5)), ((0, 8), (0, 8)), True),     # part of one row
    (((0, 4), (0, 4)), ((0, 8), (0, 8)), False),    # left half of rows
    (((0, 1), (0, 1), (2, 6)), ((0, 2), (0, 3), (0, 8)), True),
    (((0, 1), (0, 2), (2, 6)), ((0, 2), (0, 3), (0, 8)), False),
    (((4, 6),), ((0, 8),), True),
])
def test_is_contiguous_in_matches_torch(region, shard, expected):
    assert is_contiguous_in(region, shard) is expected
    full = torch.zeros([b - a for a, b in shard])
    view = full[tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(region, shard))]
    assert view.is_contiguous() is expected


def test_broadcast_when_several_receivers():
    plan = plan_realloc(TINY, Placement.parse("dp1tp2pp1@0-1"), Placement.parse("dp2tp1pp1@2-3"))
    schedule = build_schedule(plan, 1 << 20)
    assert schedule and all(m.is_broadcast and m.dsts == (2, 3) for m in schedule)
    assert {m.ranks for m in schedule} == {(0, 2, 3), (1, 2, 3)}


# ---------------------------------------------------------------- input checks


def _tiny_plan(src="dp1tp2pp1@0-1", dst="dp2tp1pp1@0-1"):
    return plan_realloc(TINY, Placement.parse(src), Placement.parse(dst))


def test_dtype_must_match_plan():
    with pytest.raises(ValueError, match="dtype_bytes=2"):
        ReallocExecutor(_tiny_plan(), 0, dtype=torch.bfloat16)


def test_bucket_must_hold_an_element():
    with pytest.raises(ValueError, match="smaller than one element"):
        ReallocExecutor(_tiny_plan(), 0, bucket_bytes=2)


def test_bad_shards_rejected_before_communication():
    ex = ReallocExecutor(_tiny_plan(), 0)  # no process group: a check must fail first
    dst = ex.allocate_dst_shards()
    with pytest.raises(ValueError, match="source shards are required"):
        ex.run(None, dst)
    src = {n: torch.zeros(tuple(b - a for a, b in r)) for n, r in ex.src_regions.items()}
    bad = dict(src)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        ex.run(bad, dst)
    wrong = dict(src, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        ex.run(wrong, dst)
    with pytest.raises(ValueError, match="dtype"):
        ex.run({k: v.double() for k, v in src.items()}, dst)
    outsider = ReallocExecutor(_tiny_plan(), 3)
    assert outsider.allocate_dst_shards() is None
    with pytest.raises(ValueError, match="not in the source placement"):
        outsider.run(src, None)


# ---------------------------------------------------------------- non-contiguous shards


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, transposed strides (non-contiguous for a 2-D tensor)."""
    return t.t().contiguous().t() if t.dim() == 2 else t


def _noncontiguous_worker(rank: int) -> bool:
    import torch.distributed as dist

    from fusedrl.models.sharding import shard_state_dict
    from fusedrl.realloc.local import random_state_dict

    src, dst = Placement.parse("dp1tp2pp2@0-3"), Placement.parse("dp2tp2pp1@1,0,3,2")
    plan = plan_realloc(TINY, src, dst)
    ex = ReallocExecutor(plan, rank, direct_min_bytes=1024, inflight=3)
    assert any(m.direct for m in ex.my_messages)  # in-place candidates must fall back
    ex.build_groups()
    full = random_state_dict(TINY, seed=5)
    src_shards = {k: _column_major(v) for k, v in
                  shard_state_dict(full, TINY, src.layout, src.rank_of(rank)).items()}
    expected = shard_state_dict(full, TINY, dst.layout, dst.rank_of(rank))
    dst_shards = {k: _column_major(torch.full_like(v, float("nan"))) for k, v in expected.items()}
    ex.run(src_shards, dst_shards)
    ok = torch.tensor([int(all(torch.equal(dst_shards[k], expected[k]) for k in expected))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def test_noncontiguous_shards_are_staged():
    assert launch(_noncontiguous_worker, 4, timeout=120) == [True] * 4


# ---------------------------------------------------------------- dtype conversion


def _convert_worker(rank: int, transport: str) -> bool:
    """A float32 source resharded into the shards of a bfloat16 model (matrices bf16,
    norm weights float32, as models.llama builds them): a frozen reference filled from
    the float32 actor (model.frozen_dtype). Each destination equals the float32 ground
    truth converted to its dtype, whether the piece travelled in place or staged."""
    import torch.distributed as dist

    from fusedrl.models.sharding import shard_state_dict
    from fusedrl.realloc.local import random_state_dict

    src, dst = Placement.parse("dp1tp2pp2@0-3"), Placement.parse("dp2tp2pp1@1,0,3,2")
    plan = plan_realloc(TINY, src, dst)
    ex = ReallocExecutor(plan, rank, direct_min_bytes=1024, inflight=3, transport=transport)
    ex.build_groups()
    full = random_state_dict(TINY, seed=7)
    src_shards = shard_state_dict(full, TINY, src.layout, src.rank_of(rank))
    expected = {k: v.to(torch.bfloat16) if v.dim() > 1 else v for k, v in
                shard_state_dict(full, TINY, dst.layout, dst.rank_of(rank)).items()}
    dst_shards = {k: torch.full_like(v, float("nan")) for k, v in expected.items()}
    stats = ex.run(src_shards, dst_shards)
    ok = all(torch.equal(dst_shards[k], expected[k]) for k in expected)
    # float32 on the wire: the plan's cross-device elements x 4 bytes
    ok = ok and stats.bytes_received == sum(
        t.numel for t in plan.transfers if not t.is_local and t.dst == rank) * 4
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_float32_source_into_bfloat16_model(transport):
    assert launch(_convert_worker, 4, (transport,), timeout=120) == [True] * 4
