"""KV-cache migration (RLHFuse §4, issue 18): a sample's KV cache moves to another
engine and decoding continues there without re-prefill; tokens and log-probs equal the
unmigrated run's, as they do for migration by re-prefill."""

import pytest
import torch

from fusedrl.generation import GenerationEngine, Request, SamplingParams
from fusedrl.models import ModelConfig
from fusedrl.models.build import build_model
from gen_helpers import random_requests

CFG = ModelConfig(vocab_size=50, hidden_size=48, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=96)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, "lm", seed=1).eval()


def _migrate_after(model, reqs, params, steps, method, dst_batch=2):
    """Generate ``reqs`` on engine A for ``steps`` steps, move every unfinished sample to
    engine B by ``method`` (kv | reprefill), finish there; samples by id."""
    a = GenerationEngine(model, max_batch_size=len(reqs), max_seq_len=64)
    b = GenerationEngine(model, max_batch_size=dst_batch, max_seq_len=64)
    a.start(params)
    b.start(params)
    a.add(reqs)
    done = {}
    for _ in range(steps):
        done.update((s.sample_id, s) for s in a.step())
    moved = 0
    for sid in a.running_ids():
        if method == "kv":
            partial, kv = a.export_kv(sid)
            assert kv is not None and kv.shape[3] == (len(partial.prompt_ids)
                                                     + len(partial.response_ids) - 1)
            b.import_kv(Request.resume(partial), kv)
        else:
            b.add(Request.resume(a.abort(sid)))
        moved += 1
    assert moved and not a.has_unfinished()
    while b.has_unfinished():
        done.update((s.sample_id, s) for s in b.step())
    return done


@pytest.mark.parametrize("method", ["kv", "reprefill"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=20, seed=7, ignore_eos=True),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=18, seed=4),
])
def test_migrated_samples_equal_unmigrated(model, method, params):
    reqs = random_requests(5, CFG.vocab_size, 9)
    full = {s.sample_id: s for s in GenerationEngine(model, max_batch_size=5, max_seq_len=64)
            .generate(reqs, params)}
    # dst_batch=2 < moved samples: some imported caches wait in the queue for a slot
    got = _migrate_after(model, reqs, params, steps=6, method=method)
    for sid, s in full.items():
        assert got[sid].response_ids == s.response_ids
        assert torch.allclose(torch.tensor(got[sid].logprobs), torch.tensor(s.logprobs),
                              atol=1e-5)


def test_import_checks_the_cache_shape(model):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a = GenerationEngine(model, max_batch_size=2, max_seq_len=32)
    a.start(params)
    a.add(Request(0, [3, 4, 5]))
    a.step()
    a.step()
    partial, kv = a.export_kv(0)
    b = GenerationEngine(model, max_batch_size=2, max_seq_len=32)
    b.start(params)
    with pytest.raises(ValueError, match="KV of shape"):
        b.import_kv(Request.resume(partial), kv[:, :, :, :-1])
    queued = GenerationEngine(model, max_batch_size=1, max_seq_len=32)
    queued.start(params)
    queued.add(Request(1, [3, 4]))
    p, none = queued.export_kv(1)  # still queued: no KV to move
    assert none is None and p.response_ids == []


def test_parcel_packing_buckets_and_unpacks():
    from fusedrl.interstage.kv_migration import bucket_sizes, pack, unpack

    layout = (2, 3, 4)  # layers, kv heads, head dim
    kvs = [torch.randn(2, 2, 3, n, 4) for n in (5, 1, 9)]
    flat = pack(kvs)
    buckets = bucket_sizes(flat.numel(), 300)  # several samples per message, some split
    assert buckets == [300, 300, 120] and sum(buckets) == flat.numel()
    for got, want in zip(unpack(flat, [5, 1, 9], layout), kvs):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="samples need"):
        unpack(flat, [5, 1], layout)


def test_transfer_terms_fit_and_methods():
    from fusedrl.interstage.kv_migration import fit_transfer, methods
    from fusedrl.scheduler.gen_cost import GenCostModel
    from fusedrl.scheduler.migration import SampleState, plan_migration

    latency, bw = fit_transfer([(1e6, 0.002 + 1e6 / 5e8), (8e6, 0.002 + 8e6 / 5e8),
                                (4e6, 0.002 + 4e6 / 5e8)])
    assert latency == pytest.approx(0.002) and bw == pytest.approx(5e8)
    with pytest.raises(ValueError, match="2 sizes"):
        fit_transfer([(1e6, 0.01), (1e6, 0.02)])
    # the simulator's rule picks per sample: short samples re-prefill, long ones move KV
    cost = GenCostModel(bs_max=8, kv_bytes_per_token=1e4, transfer_latency_s=latency,
                        transfer_bandwidth=bw, prefill_base_s=0.0, prefill_per_token_s=1e-4)
    state = {0: [SampleState(1, 5, 3), SampleState(2, 8, 200)], 1: [SampleState(3, 4, 1)],
             2: [SampleState(4, 4, 2), SampleState(5, 4, 2), SampleState(6, 4, 2)]}
    plan = plan_migration(state, threshold=6, cost=cost, max_sample_tokens=300)
    assert plan.kept == (2,)
    auto = methods(plan, "auto", can_kv=True)
    assert auto == {1: "reprefill", 2: "kv", 3: "reprefill"}
    assert set(methods(plan, "kv", can_kv=True).values()) == {"kv"}
    assert set(methods(plan, "auto", can_kv=False).values()) == {"reprefill"}
    with pytest.raises(ValueError, match="fusion.migration='fast'"):
        methods(plan, "fast", can_kv=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kv", "reprefill", "auto"])
def test_ray_migration_equals_unmigrated(ray_session, mode):
    """Two Ray workers: the long tail of one instance moves to the other (by KV transfer
    over the worker group, or by re-prefill); the samples equal the unfused run's."""
    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer
    from test_runtime import SMALL
    # MigrateEarly: imported so that its policy registers
    from test_runtime_interstage import (DP2, TAIL_LENGTHS, MigrateEarly,  # noqa: F401
                                         unfused_and_fused_long_tail)

    t = make_trainer(load_config(None, SMALL + DP2 + [
        "generation.max_new_tokens=24", "fusion.interstage=true",
        "fusion.interstage_policy=test-migrate-early", "fusion.interstage_steps=2",
        f"fusion.migration={mode}"]))
    try:
        rollout = t.stages.rollout
        unfused, fused = unfused_and_fused_long_tail(t)
        m = fused.metrics
        moved = m["interstage/migrated"]
        assert moved >= 1
        if mode == "kv":
            assert m["interstage/migrated_kv"] == moved and m["interstage/kv_bytes"] > 0
            assert m["interstage/kv_transfer_s"] > 0 and m["interstage/migration_resume_s"] > 0
        elif mode == "reprefill":
            assert m["interstage/migrated_kv"] == 0 and m["interstage/kv_bytes"] == 0
            assert rollout.cost.transfer_latency_s >= 1e6  # priced out of reach
        else:  # the cost model's choice, its transfer terms probed on the workers
            assert rollout.cost.transfer_latency_s < 1e6
            assert m["interstage/migrated_kv"] + m["interstage/migrated_reprefill"] == moved
        a, b = unfused.batch, fused.batch
        assert torch.equal(a.input_ids, b.input_ids) and b.response_lens.tolist() == TAIL_LENGTHS
        torch.testing.assert_close(b.gen_logprobs, a.gen_logprobs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.old_logp, unfused.old_logp, rtol=1e-4, atol=1e-5)
    finally:
        t.close()
