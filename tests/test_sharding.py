"""Tests of fusedrl.models.sharding: the (config, layout, rank) -> shard mapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fusedrl.layout import ParallelLayout
from fusedrl.models import PRESETS, ModelConfig
from fusedrl.models import sharding as sh

TINY = PRESETS["tiny"]  # 4 layers, 4 heads, 2 kv heads, hidden 64
GQA = ModelConfig(vocab_size=48, hidden_size=64, intermediate_size=96, num_layers=5,
                  num_heads=8, num_kv_heads=2)
MHA = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=4, head_dim=6)  # head_dim != hidden/heads

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 2, 2), (2, 2, 1), (2, 1, 3),
           (1, 4, 1), (1, 8, 1), (2, 4, 1), (1, 2, 5)]


def _valid(config: ModelConfig, layout: ParallelLayout) -> bool:
    try:
        layout.check_model(config)
        return True
    except ValueError:
        return False


CASES = [(c, ParallelLayout(*l)) for c in (TINY, GQA, MHA) for l in LAYOUTS
         if _valid(c, ParallelLayout(*l))]


def _full_state(config: ModelConfig, head: str = "lm", lib: str = "numpy") -> dict:
    out, offset = {}, 0
    for name, shape in sh.param_shapes(config, head).items():
        n = int(np.prod(shape))
        arr = np.arange(offset, offset + n, dtype=np.float64).reshape(shape)
        offset += n
        out[name] = torch.from_numpy(arr) if lib == "torch" else arr
    return out


# ---- shapes and stages ----------------------------------------------------------------


def test_param_shapes_hf_order_and_sizes() -> None:
    shapes = sh.param_shapes(TINY)
    names = list(shapes)
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert names[1:10] == [f"model.layers.0.{s}" for s in (
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
        "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight")]
    assert len(shapes) == 1 + 9 * TINY.num_layers + 2
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (TINY.kv_size, 64)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (64, TINY.q_size)
    assert shapes["model.layers.3.mlp.down_proj.weight"] == (64, 128)
    assert sum(int(np.prod(s)) for s in shapes.values()) == TINY.num_params()

    value = sh.param_shapes(MHA, head="value")
    assert "lm_head.weight" not in value and value["score.weight"] == (1, 32)
    assert value["model.layers.0.self_attn.q_proj.weight"] == (24, 32)  # 4 heads * 6
    assert sum(int(np.prod(s)) for s in value.values()) == MHA.num_params(value_head=True)
    with pytest.raises(ValueError, match="head"):
        sh.param_shapes(TINY, head="policy")


@pytest.mark.parametrize("num_layers", range(1, 13))
def test_stage_layers_matches_array_split(num_layers: int) -> None:
    for pp in range(1, num_layers + 1):
        expected = [list(a) for a in np.array_split(np.arange(num_layers), pp)]
        assert [list(r) for r in sh.stage_layers(num_layers, pp)] == expected
        config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                             num_layers=num_layers, num_heads=2, num_kv_heads=1)
        for stage, layers in enumerate(expected):
            for layer in layers:
                assert sh.param_stage(f"model.layers.{layer}.mlp.up_proj.weight",
                                      config, pp) == stage
    with pytest.raises(ValueError, match="pp=13"):
        sh.stage_layers(12, 13)
    with pytest.raises(ValueError, match="pp=0"):
        sh.stage_layers(4, 0)


def test_param_kind_and_unknown_names() -> None:
    assert sh.param_kind("model.layers.7.self_attn.q_proj.weight") == sh.COLUMN
    assert sh.param_kind("model.layers.7.self_attn.v_proj.weight") == sh.KV
    assert sh.param_kind("model.layers.0.mlp.down_proj.weight") == sh.ROW
    assert sh.param_kind("model.layers.0.input_layernorm.weight") == sh.REPLICATED
    assert sh.param_kind("lm_head.weight") == sh.COLUMN
    assert sh.param_kind("score.weight") == sh.REPLICATED
    for bad in ("model.layers.0.self_attn.q_proj.bias", "model.rotary.inv_freq"):
        with pytest.raises(ValueError, match="not a parameter"):
            sh.param_kind(bad)


# ---- regions ----------------------------------------------------------------------------


@pytest.mark.parametrize("config,layout", CASES, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("head", ["lm", "value"])
def test_regions_tile_each_parameter(config: ModelConfig, layout: ParallelLayout,
                                     head: str) -> None:
    """Each dp replica's ranks tile every parameter exactly once (replicas of a region
    counted once); all dp replicas hold identical shards; each parameter lives on
    exactly one stage."""
    shapes = sh.param_shapes(config, head)
    per_rank = [sh.shard_regions(config, layout, r, head) for r in range(layout.world_size)]
    for dp in range(layout.dp):
        count = {name: np.zeros(shape, dtype=np.int64) for name, shape in shapes.items()}
        stages = {name: set() for name in shapes}
        for pp in range(layout.pp):
            distinct: dict[str, set] = {}
            for tp in range(layout.tp):
                rank = layout.rank(dp, tp, pp)
                assert per_rank[rank] == per_rank[layout.rank(0, tp, pp)]
                for name, region in per_rank[rank].items():
                    distinct.setdefault(name, set()).add(region)
                    stages[name].add(pp)
            for name, regions in distinct.items():
                for region in regions:
                    count[name][sh.region_slices(region)] += 1
        for name in shapes:
            assert (count[name] == 1).all(), name
            assert len(stages[name]) == 1, name


def test_column_row_and_replicated_regions() -> None:
    layout = ParallelLayout(1, 2, 1)
    r1 = sh.shard_regions(GQA, layout, 1)
    assert r1["model.embed_tokens.weight"] == ((24, 48), (0, 64))
    assert r1["lm_head.weight"] == ((24, 48), (0, 64))
    assert r1["model.layers.2.self_attn.q_proj.weight"] == ((32, 64), (0, 64))
    assert r1["model.layers.2.self_attn.o_proj.weight"] == ((0, 64), (32, 64))
    assert r1["model.layers.2.mlp.gate_proj.weight"] == ((48, 96), (0, 64))
    assert r1["model.layers.2.mlp.down_proj.weight"] == ((0, 64), (48, 96))
    assert r1["model.layers.2.input_layernorm.weight"] == ((0, 64),)
    assert r1["model.norm.weight"] == ((0, 64),)
    assert sh.shard_regions(GQA, layout, 1, head="value")["score.weight"] == ((0, 1), (0, 64))


@pytest.mark.parametrize("tp,expected_heads", [
    (1, [[0, 1]]),
    (2, [[0], [1]]),
    (4, [[0], [0], [1], [1]]),  # tp > kv heads: each head replicated on tp/kv ranks
    (8, [[0]] * 4 + [[1]] * 4),
])
def test_kv_heads_split_and_replicated(tp: int, expected_heads: list[list[int]]) -> None:
    layout = ParallelLayout(1, tp, 1)
    hd = GQA.head_dim  # 8
    group = GQA.num_heads // GQA.num_kv_heads  # query heads per kv head
    for r in range(tp):
        regions = sh.shard_regions(GQA, layout, r)
        heads = expected_heads[r]
        for p in ("k_proj", "v_proj"):
            assert regions[f"model.layers.0.self_attn.{p}.weight"] == (
                (heads[0] * hd, (heads[-1] + 1) * hd), (0, 64))
        # The kv heads a rank holds are exactly those its query heads attend with.
        (q0, q1), _ = regions["model.layers.0.self_attn.q_proj.weight"]
        needed = sorted({q // hd // group for q in range(q0, q1)})
        assert needed == heads


def test_kv_heads_more_than_tp() -> None:
    config = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=32, num_layers=1,
                         num_heads=8, num_kv_heads=8)
    regions = [sh.shard_regions(config, ParallelLayout(1, 4, 1), r) for r in range(4)]
    assert [r["model.layers.0.self_attn.k_proj.weight"][0] for r in regions] == [
        (0, 16), (16, 32), (32, 48), (48, 64)]  # 2 heads of 8 rows each per rank


def test_pipeline_stages_hold_embedding_first_and_head_last() -> None:
    layout = ParallelLayout(1, 1, 3)
    config = GQA  # 5 layers -> stages of 2, 2, 1
    stages = [sh.shard_regions(config, layout, layout.rank(0, 0, p)) for p in range(3)]
    layers = [sorted({sh.param_layer(n) for n in s if sh.param_layer(n) is not None})
              for s in stages]
    assert layers == [[0, 1], [2, 3], [4]]
    assert "model.embed_tokens.weight" in stages[0]
    assert all("model.embed_tokens.weight" not in s for s in stages[1:])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert name in stages[2] and name not in stages[0] and name not in stages[1]
    single = sh.shard_regions(config, ParallelLayout(1, 1, 1), 0)
    assert "model.embed_tokens.weight" in single and "lm_head.weight" in single


def test_bad_layouts_name_the_number() -> None:
    with pytest.raises(ValueError, match="tp=3 does not divide num_heads=4"):
        sh.shard_regions(TINY, ParallelLayout(1, 3, 1), 0)
    with pytest.raises(ValueError, match="pp=5 is larger than num_layers=4"):
        sh.shard_regions(TINY, ParallelLayout(1, 1, 5), 0)
    config = ModelConfig(vocab_size=24, hidden_size=48, intermediate_size=24, num_layers=2,
                         num_heads=12, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads=4"):
        sh.shard_regions(config, ParallelLayout(1, 6, 1), 0)
    config = ModelConfig(vocab_size=30, hidden_size=64, intermediate_size=100, num_layers=1,
                         num_heads=8, num_kv_heads=8)
    with pytest.raises(ValueError, match="intermediate_size=100"):
        sh.shard_regions(config, ParallelLayout(1, 8, 1), 0)
    with pytest.raises(ValueError, match="vocab_size=30"):
        sh.shard_regions(config, ParallelLayout(1, 4, 1), 0)
    with pytest.raises(ValueError, match="rank 4"):
        sh.shard_regions(TINY, ParallelLayout(2, 2, 1), 4)


# ---- slicing and merging ----------------------------------------------------------------


@pytest.mark.parametrize("config,layout", CASES, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_shard_then_merge_round_trip(config: ModelConfig, layout: ParallelLayout,
                                     lib: str) -> None:
    head = "value" if layout.pp > 1 else "lm"
    full = _full_state(config, head, lib)
    shards = [sh.shard_state_dict(full, config, layout, r, head)
              for r in range(layout.world_size)]
    for r, shard in enumerate(shards):
        regions = sh.shard_regions(config, layout, r, head)
        assert list(shard) == list(regions)
        for name, t in shard.items():
            assert tuple(t.shape) == sh.region_shape(regions[name])
            assert (t == full[name][sh.region_slices(regions[name])]).all()
            if lib == "torch":
                assert t.is_contiguous()
            else:
                assert t.flags.c_contiguous
    merged = sh.merge_shards(shards, config, layout, head)
    assert list(merged) == list(full)
    for name in full:
        assert type(merged[name]) is type(full[name])
        assert (merged[name] == full[name]).all(), name
    # One dp replica suffices.
    replica0 = {r: shards[r] for r in range(layout.world_size) if layout.coord(r).dp == 0}
    merged0 = sh.merge_shards(replica0, config, layout, head)
    assert all((merged0[n] == full[n]).all() for n in full)


def test_merge_detects_missing_and_misshaped_shards() -> None:
    layout = ParallelLayout(1, 2, 2)
    full = _full_state(TINY)
    shards = {r: sh.shard_state_dict(full, TINY, layout, r) for r in range(4)}
    with pytest.raises(ValueError, match="cover"):
        sh.merge_shards({r: s for r, s in shards.items() if r != 3}, TINY, layout)
    bad = dict(shards)
    bad[0] = dict(shards[0])
    bad[0]["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="shape"):
        sh.merge_shards(bad, TINY, layout)
    with pytest.raises(ValueError, match="does not hold"):
        sh.merge_shards({2: shards[0]}, TINY, layout)


def test_tied_checkpoint_is_untied_on_load() -> None:
    tied = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
    full = _full_state(tied)
    del full["lm_head.weight"]
    layout = ParallelLayout(1, 2, 1)
    shard = sh.shard_state_dict(full, tied, layout, 1)
    assert (shard["lm_head.weight"] == full["model.embed_tokens.weight"][16:]).all()
    untied = ModelConfig(**{**tied.to_dict(), "tie_word_embeddings": False})
    with pytest.raises(KeyError, match="lm_head.weight"):
        sh.shard_state_dict(full, untied, layout, 1)


def test_shard_tensor_and_local_slices() -> None:
    t = torch.arange(24).reshape(4, 6)
    assert (sh.shard_tensor(t, ((1, 3), (2, 6))) == t[1:3, 2:6]).all()
    with pytest.raises(ValueError, match="dims"):
        sh.shard_tensor(t, ((0, 4),))
    with pytest.raises(ValueError, match="outside"):
        sh.shard_tensor(t, ((0, 5), (0, 6)))
    shard_region = ((2, 4), (0, 6))
    shard = sh.shard_tensor(t, shard_region)
    region = ((3, 4), (1, 5))
    assert (shard[sh.local_slices(region, shard_region)] == t[3:4, 1:5]).all()
    with pytest.raises(ValueError, match="not inside"):
        sh.local_slices(((1, 3), (0, 6)), shard_region)
    assert sh.intersect(((0, 4), (0, 6)), ((4, 8), (0, 6))) is None
    assert sh.intersect(((0, 4), (0, 6)), ((2, 8), (3, 9))) == ((2, 4), (3, 6))
    assert sh.region_numel(((2, 4), (3, 6))) == 6


def test_all_pairs_of_tp_ranks_disjoint_or_identical() -> None:
    """The planner relies on this: within a layout, regions of one parameter are
    identical (replicas) or disjoint."""
    for config, layout in CASES:
        per_rank = [sh.shard_regions(config, layout, r) for r in range(layout.world_size)]
        for a, b in itertools.combinations(per_rank, 2):
            for name in a.keys() & b.keys():
                assert a[name] == b[name] or sh.intersect(a[name], b[name]) is None
