"""Token-budget micro-batches, packed sequences, balanced data parallelism and pad
ratios (issue 19)."""

import pytest
import torch

from fusedrl.cli.train import train
from fusedrl.config import ConfigError, ModelSection, load_config
from fusedrl.generation.engine import Sample
from fusedrl.models.build import build_model
from fusedrl.models.config import ModelConfig
from fusedrl.packing import forward, pack, pack_rows, packed_tokens
from fusedrl.rollout import RolloutBatch, infer_head
from fusedrl.update import (actor_loss, assign_dp, critic_loss, dp_micro_batches,
                            micro_batches, minibatch_schedule, pad_ratio, padded_tokens,
                            streamed_micro_size, unpermute)

LONG_TAILED = torch.tensor([3, 40, 5, 4, 38, 6, 5, 4, 39, 3, 7, 5, 4, 6, 41, 5])


def test_equal_lengths_give_the_sample_count_micro_batches():
    lengths = torch.full((16,), 9)
    rows = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    by_count = micro_batches(rows, lengths, 4)
    by_tokens = micro_batches(rows, lengths, 4, tokens=4 * 9)
    by_packed = micro_batches(rows, lengths, 4, tokens=4 * 9, packed=True)
    assert len(by_count) == len(by_tokens) == len(by_packed) == 4
    for a, b, c in zip(by_count, by_tokens, by_packed):
        assert torch.equal(a, b) and torch.equal(a, c)
    base = ["ppo.mini_batch_size=8", "ppo.micro_batch_size=4"]
    cfg = load_config(None, base + ["ppo.micro_batch_tokens=0", "ppo.packed=false"]).ppo
    for extra in (["ppo.packed=false"], ["ppo.packed=true"]):
        tok = load_config(None, base + ["ppo.micro_batch_tokens=36"] + extra).ppo
        for a, b in zip(minibatch_schedule(64, cfg, 3, 1, lengths.repeat(4)),
                        minibatch_schedule(64, tok, 3, 1, lengths.repeat(4))):
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
    # and packing such a micro-batch leaves its rows as they are (one sample each)
    batch = random_batch([(4, 5)] * 6)
    assert pack(batch) is batch


def test_token_budget_groups_by_length_within_the_budget():
    rows = torch.arange(len(LONG_TAILED))
    micros = micro_batches(rows, LONG_TAILED, 4, tokens=48)
    assert sorted(torch.cat(micros).tolist()) == rows.tolist()  # every row once
    assert all(t <= 48 for t in padded_tokens(micros, LONG_TAILED))
    by_count = micro_batches(rows, LONG_TAILED, 4)
    assert pad_ratio(micros, LONG_TAILED) < 1.2 < pad_ratio(by_count, LONG_TAILED)
    # a row longer than the budget goes alone
    alone = micro_batches(rows, LONG_TAILED, 4, tokens=20)
    assert [len(m) for m in alone[:4]] == [1, 1, 1, 1]


def test_unpermute_restores_row_order():
    rows = torch.arange(len(LONG_TAILED))
    micros = micro_batches(rows, LONG_TAILED, 4, tokens=48)
    parts = [LONG_TAILED[idx] * 10 for idx in micros]
    assert torch.equal(unpermute(parts, micros), LONG_TAILED * 10)


def test_assign_dp_balances_tokens_longest_first():
    assert assign_dp([5] * 6, 2) == [0, 1, 0, 1, 0, 1]  # equal costs: k % dp
    costs = [10, 1, 10, 1]  # k % dp would put 20 on rank 0 and 2 on rank 1
    owner = assign_dp(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == d) for d in range(2)]
    assert loads == [11, 11]
    with pytest.raises(ValueError, match="dp=0"):
        assign_dp(costs, 0)
    micros = micro_batches(torch.arange(16), LONG_TAILED, 4)
    ranks = dp_micro_batches(micros, LONG_TAILED, 2)
    assert sorted(k for r in ranks for k, _ in r) == list(range(len(micros)))
    assert all([k for k, _ in r] == sorted(k for k, _ in r) for r in ranks)


def test_bad_token_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="ppo.micro_batch_tokens=-2"):
        load_config(None, ["ppo.micro_batch_tokens=-2"])


def test_default_budget_is_micro_batch_size_times_the_longest_sequence():
    c = load_config(None, ["ppo.micro_batch_size=4"]).ppo
    assert c.packed and c.micro_batch_tokens == c.infer_micro_batch_tokens == -1
    rows = torch.arange(len(LONG_TAILED))
    auto = micro_batches(rows, LONG_TAILED, 4, tokens=-1, packed=True)
    explicit = micro_batches(rows, LONG_TAILED, 4, tokens=4 * 41, packed=True)
    assert [m.tolist() for m in auto] == [m.tolist() for m in explicit]
    assert len(auto) < len(micro_batches(rows, LONG_TAILED, 4))  # short samples share
    # equal lengths: the sample-count micro-batches
    assert len(micro_batches(rows, torch.full((16,), 9), 4, tokens=-1, packed=True)) == 4
    assert streamed_micro_size([20, 5, 5, 10, 20, 3], c) == 6  # 4 x 20: rows 20|20|10+5+5|3


def test_pack_rows_is_first_fit_decreasing():
    lens = [3, 9, 4, 6, 2, 5]
    rows = pack_rows(lens, 9)
    assert rows == [[1], [3, 0], [5, 2], [4]]  # 9 | 6+3 | 5+4 | 2
    assert all(sum(lens[i] for i in r) <= 9 for r in rows)
    assert sorted(i for r in rows for i in r) == list(range(len(lens)))
    assert packed_tokens(lens) == 4 * 9 and packed_tokens([]) == 0
    assert pack_rows([12, 3], 9) == [[0], [1]]  # longer than a row: a row of its own


def test_packed_budgets_remove_the_padding():
    rows = torch.arange(len(LONG_TAILED))
    micros = micro_batches(rows, LONG_TAILED, 4, tokens=82, packed=True)
    assert sorted(torch.cat(micros).tolist()) == rows.tolist()
    assert all(t <= 82 for t in padded_tokens(micros, LONG_TAILED, packed=True))
    padded = micro_batches(rows, LONG_TAILED, 4, tokens=82)
    # the tail fills the long samples' rows: 4 rows of 41 hold all 215 tokens
    assert pad_ratio(micros, LONG_TAILED, packed=True) <= 1.1 < pad_ratio(padded, LONG_TAILED)
    assert len(micros) < len(padded)


def test_packed_micro_batches_fill_the_gaps_within_the_budget():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        # long-tailed lengths (lognormal), in a random row order
        lengths = (torch.randn(40, generator=g) * 0.9 + 2.8).exp().long().clamp(2, 300)
        rows = torch.randperm(40, generator=g)
        budget = 2 * int(lengths.max())
        micros = micro_batches(rows, lengths, 2, tokens=budget, packed=True)
        assert sorted(torch.cat(micros).tolist()) == list(range(40))
        # the rows the forward lays out (pack_rows) stay within the budget
        assert all(t <= budget for t in padded_tokens(micros, lengths, packed=True))
        assert pad_ratio(micros, lengths, packed=True) < pad_ratio(
            micro_batches(rows, lengths, 2, tokens=budget), lengths)


def test_streamed_micro_batches_honor_the_inference_budget():
    on = load_config(None, ["ppo.infer_micro_batch_tokens=40"]).ppo
    assert streamed_micro_size([20, 5, 5, 10, 20, 3], on) == 4  # rows 20 | 5+5+10
    assert streamed_micro_size([50, 5], on) == 1  # over the budget: alone
    off = load_config(None, ["ppo.infer_micro_batch_tokens=40", "ppo.packed=false"]).ppo
    assert streamed_micro_size([20, 5, 5, 10, 20, 3], off) == 2  # 2 rows x 20
    count = load_config(None, ["ppo.infer_micro_batch_tokens=0", "ppo.micro_batch_size=4"])
    assert streamed_micro_size([20, 5, 5, 10, 1], count.ppo) == 4


# --------------------------------------------------------------- packed sequences

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128, rope_theta=500.0)
# (prompt, response) lengths: long-tailed, so that rows hold several samples
SHAPES = [(3, 20), (5, 2), (4, 7), (2, 1), (6, 3), (3, 12), (4, 4), (2, 9)]


def random_batch(shapes, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(i, torch.randint(1, 97, (p,), generator=g).tolist(),
                      torch.randint(1, 97, (r,), generator=g).tolist(), [0.0] * r, "stop")
               for i, (p, r) in enumerate(shapes)]
    return RolloutBatch.from_samples(samples, 0)


def test_pack_lays_samples_end_to_end():
    batch = random_batch(SHAPES)
    packed = pack(batch).packed
    lens = (batch.prompt_lens + batch.response_lens).tolist()
    assert packed.shape == (len(pack_rows(lens, max(lens))), max(lens))
    assert packed.shape[0] < len(batch)
    flat_ids, flat_pos = packed.ids.flatten(), packed.positions.flatten()
    for b, n in enumerate(lens):
        s = int(packed.starts[b])
        assert torch.equal(flat_ids[s:s + n], batch.input_ids[b, :n])
        assert torch.equal(flat_pos[s:s + n], torch.arange(n))  # restart per sample
        assert (packed.segments.flatten()[s:s + n] == b).all()
    assert int((packed.segments >= 0).sum()) == sum(lens)


def _model(head, dtype):
    model = build_model(CFG, head, seed=1, dtype=dtype)
    if head == "value":  # a zero-initialised value head would make every value 0
        with torch.no_grad():
            model.score.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return model


# float64: the packed and padded forwards differ only in float summation order, so the
# equality holds to ~1e-12; float32 (the runtime's dtype) to the requirement's 1e-5.
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_packed_inference_equals_padded(dtype, rel):
    batch = random_batch(SHAPES)
    packed = pack(batch)
    width = batch.response_mask.shape[1]
    for head, kind in (("lm", "logp"), ("value", "values"), ("value", "score")):
        model = _model(head, dtype).eval()
        with torch.no_grad():
            a = infer_head(kind, model(batch.input_ids), batch, model.tp_group, width, 0.7)
            b = infer_head(kind, forward(model, packed), packed, model.tp_group, width, 0.7)
        assert a.abs().max() > 0.1, kind
        torch.testing.assert_close(b, a, rtol=rel, atol=rel * float(a.abs().max()))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_packed_losses_and_gradients_equal_padded(dtype, rel, agg):
    """Actor loss (clipped policy loss, KL loss, entropy bonus) and critic loss of one
    micro-batch, and the gradients of every parameter, packed against padded."""
    batch = random_batch(SHAPES)
    packed = pack(batch)
    config = load_config(None, ["ppo.entropy_coef=0.01", "actor.use_kl_loss=true",
                                f"actor.loss_agg_mode={agg}"])
    g = torch.Generator().manual_seed(3)
    r = batch.response_mask.shape[1]
    targets = {k: torch.randn(len(batch), r, generator=g, dtype=dtype) * 0.1
               for k in ("advantages", "values", "returns")}
    targets["old_logp"] = targets["ref_logp"] = None
    idx = torch.arange(len(batch))
    for name, head, loss_fn in (("actor", "lm", actor_loss), ("critic", "value", critic_loss)):
        losses, grads = [], []
        for mb in (batch, packed):
            model = _model(head, dtype)
            if name == "actor" and targets["old_logp"] is None:
                with torch.no_grad():  # old/ref log-probs near the current ones
                    lp = infer_head("logp", model(batch.input_ids), batch, model.tp_group,
                                    r, 0.7).to(dtype)
                targets["old_logp"] = lp + 0.05 * torch.randn(lp.shape, generator=g,
                                                              dtype=dtype)
                targets["ref_logp"] = lp - 0.05
            loss, _ = loss_fn(forward(model, mb), mb, idx, targets, model.tp_group, config,
                              0.7)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters()})
        torch.testing.assert_close(losses[1], losses[0], rtol=rel, atol=0)
        for n, ga in grads[0].items():
            torch.testing.assert_close(grads[1][n], ga, rtol=rel,
                                       atol=rel * float(ga.abs().max()), msg=n)


SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=24", "generation.forced_lengths=lognormal:4,24",
         "data.num_prompts=64", "ppo.ppo_epochs=2", "ppo.actor_lr=0.001",
         "ppo.critic_lr=0.001", "trainer.iterations=2"]
# The frozen models (reference, reward) in float32 where their dtype is a switch
# (model.frozen_dtype): bfloat16 forwards of differently shaped micro-batches differ by
# ~1e-3, far above the 1e-5 this equivalence is held to.
if "frozen_dtype" in ModelSection.__dataclass_fields__:
    SMALL = SMALL + ["model.frozen_dtype=float32"]
PADDED = ["ppo.packed=false", "ppo.micro_batch_tokens=0", "ppo.infer_micro_batch_tokens=0"]
BUDGETS = ["ppo.micro_batch_tokens=64", "ppo.infer_micro_batch_tokens=64"]
EQUAL = ("actor/grad_norm", "critic/grad_norm", "critic/values/mean",
         "critic/advantages/mean", "actor/reward_kl_penalty", "actor/pg_loss",
         "critic/vf_loss", "actor/ppo_kl", "rollout/logprob_diff_max")


def assert_equal_runs(a_run, b_run, rel, keys=EQUAL):
    # second iteration: generated and inferred with the weights both updates produced
    for it, (a, b) in enumerate(zip(a_run, b_run), 1):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (it, key)


@pytest.mark.slow
def test_budgets_and_packing_equal_padded_on_one_device(tmp_path):
    padded = train(load_config(None, SMALL + PADDED), tmp_path / "a", show_progress=False)
    budget = train(load_config(None, SMALL + BUDGETS + ["ppo.packed=false"]), tmp_path / "b",
                   show_progress=False)
    packed = train(load_config(None, SMALL + BUDGETS), tmp_path / "c", show_progress=False)
    assert_equal_runs(padded, budget, 1e-5)
    assert_equal_runs(padded, packed, 1e-5)
    for it, (a, b, c) in enumerate(zip(padded, budget, packed), 1):
        for key in ("perf/pad_ratio/inference", "perf/pad_ratio/train"):
            assert 1.0 <= c[key] <= b[key] < a[key], (it, key)


# The layouts the runtime tests (tests/test_runtime.py, tests/test_runtime_fused.py):
# data, tensor and pipeline (1F1B) parallel, and the fused actor/critic schedule with
# the critic's stages reversed (its per-stage costs profiled on a packed micro-batch).
RAY_LAYOUTS = {
    "dp2": ["placement.default=dp2tp1pp1@0-1"],
    "tp2": ["placement.default=dp1tp2pp1@0-1"],
    "pp2-1f1b": ["placement.default=dp1tp1pp2@0-1"],
    "fused": ["placement.default=dp1tp1pp2@0-1", "placement.critic_train=dp1tp1pp2@1,0",
              "placement.critic_infer=dp1tp1pp2@1,0", "fusion.intrastage=true"],
}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("layout", list(RAY_LAYOUTS))
def test_packing_and_budgets_on_ray_layouts_equal_padded(layout, ray_session, tmp_path):
    """Ray inference (rows back in order) and training with packed micro-batches under
    token budgets, balanced over dp ranks (uneven counts per rank), equal the padded
    sample-count run of the same layout."""
    base = SMALL + ["cluster.devices=2"] + RAY_LAYOUTS[layout]
    padded = train(load_config(None, base + PADDED), tmp_path / "a", show_progress=False)
    packed = train(load_config(None, base + BUDGETS), tmp_path / "b", show_progress=False)
    assert_equal_runs(padded, packed, 1e-5)
    assert packed[-1]["perf/pad_ratio/train"] < padded[-1]["perf/pad_ratio/train"]
