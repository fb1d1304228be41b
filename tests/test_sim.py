"""Tests of the cluster simulator: roofline counts, calibration, iteration, CLI.

Sanity against RLHFuse's published ranges (1.2-1.6x gen+inference, 1.2-1.3x
training, 1.2-1.4x end to end) is a note in the report, not a test: the numbers
depend on efficiency factors no one has calibrated on Hopper GPUs here.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from fusedrl.cli.main import app
from fusedrl.layout import ParallelLayout, Placement
from fusedrl.models.config import PRESETS
from fusedrl.realloc import plan_realloc
from fusedrl.sim.calibration import ProfileSpec, calibrate_on_cpu
from fusedrl.sim.iteration import IterationSimulator, Workload, _realloc_bytes, realloc_time_s
from fusedrl.sim.roofline import (Efficiency, Hardware, ProfilePoint, Roofline, Work,
                                  calibrate)

TINY = PRESETS["tiny"]  # h 64, i 128, 4 layers, 4 heads (q 64), 2 kv heads of 16


def test_layer_flops_and_bytes_match_a_hand_count():
    roof = Roofline(TINY, dtype_bytes=2)
    # linear: 2 * (q 64x64 + k,v 2x64x32 + o 64x64 + mlp 3x64x128) per token
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert per_token == 73728
    # causal prefill of 8 tokens: 36 (query, key) pairs, 4 * q FLOPs each
    w = roof.layers_work(1, tokens=8, attn_pairs=36, tp=1)
    assert w.flops == 8 * per_token + 36 * 4 * 64
    # tp=2 halves every matmul (kv: one of the two heads per rank) and the attention
    assert roof.layers_work(1, 8, 36, tp=2).flops == w.flops / 2
    # weights read once: the layer's parameters (+ 2 norms) in 16-bit
    layer_params = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert roof.layer_params(1) == layer_params
    assert TINY.num_params() == (64 * 64 * 2 + 4 * layer_params + 64)
    no_tokens = roof.layers_work(1, tokens=0, attn_pairs=0, tp=1)
    assert no_tokens.bytes == 2 * layer_params and no_tokens.flops == 0
    # decode reads 2 (k, v) x 32 x 2 bytes per context token per layer
    d = roof.layers_work(1, 1, 100, 1, kv_read_tokens=100) .bytes - roof.layers_work(1, 1, 100, 1).bytes
    assert d == 100 * 2 * 32 * 2
    # the training backward is 2x the forward's FLOPs (3x with recomputation)
    fwd, bwd = roof.train_works(2, 16)
    assert bwd[0].flops == pytest.approx(2 * fwd[0].flops)
    fwd_r, bwd_r = Roofline(TINY, recompute=True).train_works(2, 16)
    assert bwd_r[0].flops == pytest.approx(3 * fwd_r[0].flops)


def test_decode_is_memory_bound_and_prefill_compute_bound_on_h100():
    roof = Roofline(PRESETS["llama-13b"])
    tp2 = ParallelLayout(1, 2, 1)
    decode = sum(roof.decode_works(32, 32 * 768, tp2), Work())
    prefill = sum(roof.prefill_works(8, 512, tp2), Work())
    assert roof.bound(decode, "decode") == "memory"
    assert roof.bound(prefill, "prefill") == "compute"
    # decode throughput grows with the batch (weights read once per step)
    assert roof.decode_step_s(64, 64 * 512, tp2) < 8 * roof.decode_step_s(8, 8 * 512, tp2)


def test_calibrate_reproduces_synthetic_measurements():
    hw = Hardware(peak_flops=1e12, hbm_bandwidth=1e11)
    roof = Roofline(TINY, hw, Efficiency(), dtype_bytes=4)
    works = [sum(roof.forward_works(b, 32), Work()) for b in (1, 2, 4, 8)]
    # the device time scaled, plus a constant (what the host adds: launches, Python)
    truth = [2.5 * roof.device_s(w, "infer") + 0.004 for w in works]
    points = [ProfilePoint("infer", w, t) for w, t in zip(works, truth)]
    after = calibrate(roof.eff, roof, points)
    fitted = roof.with_efficiency(after)
    assert [fitted.time_s(w, "infer") for w in works] == pytest.approx(truth, rel=1e-6)
    assert after.mfu_infer == pytest.approx(roof.eff.mfu_infer / 2.5)
    assert after.overhead_infer_s == pytest.approx(0.004)
    # the fitted constant holds the host's time: no launch floor or per-sequence term
    assert after.launch_infer_s == 0.0 and after.host_per_seq_infer_s == 0.0
    assert after.mfu_train == roof.eff.mfu_train  # no train points: unchanged
    assert after.launch_train_s == roof.eff.launch_train_s


def test_calibration_on_the_native_engine_moves_predictions_to_measurements():
    spec = ProfileSpec(decode_batches=(1, 8), prompt_len=8, decode_steps=9, prefill_batches=(1, 8),
                       infer_shapes=((1, 32), (4, 64)), train_shapes=((1, 32), (4, 64)),
                       repeats=1, chunk=2)
    report = calibrate_on_cpu(PRESETS["small"], spec)
    assert report.hardware.peak_flops > 1e8 and report.hardware.hbm_bandwidth > 1e8
    assert set(report.ratio_after) == {"prefill", "decode", "infer", "train"}
    for phase, after in report.ratio_after.items():
        before = report.ratio_before[phase]
        assert abs(np.log(after)) <= abs(np.log(before)) + 1e-9, phase
        assert 0.75 < after < 1.25, (phase, after)


def test_reduced_layer_realloc_plan_equals_the_full_plan():
    model = PRESETS["small"]  # 8 layers
    src, dst = ParallelLayout(1, 2, 2), ParallelLayout(2, 2, 1)
    full = plan_realloc(model, Placement(src, range(4)), Placement(dst, range(4)), dtype_bytes=2)
    per = np.array(_realloc_bytes(model, "lm", src, dst, 4, 2, 2))
    sent = np.zeros(4)
    for t in full.remote_transfers:
        sent[t.src] += t.numel * 2
    np.testing.assert_allclose(per[:, 0] + per[:, 1], sent)
    assert per[:, :2].sum() == full.bytes_moved
    roof = Roofline(model, Hardware(gpus_per_node=2))
    assert realloc_time_s(roof, "lm", src, src, 4) == 0.0
    assert realloc_time_s(roof, "lm", src, dst, 4) > 0.0


@pytest.fixture(scope="module")
def small_cluster():
    w = Workload.build(batch_size=64, prompt_len=128, max_new_tokens=256, mini_batch_size=16,
                       micro_batch_size=1, max_gen_batch=64, seed=0)
    sim = IterationSimulator(PRESETS["llama-7b"], PRESETS["llama-7b"], w, 16, schedule_time_s=0.5)
    return sim.run()


def test_fused_iteration_is_no_slower_than_the_baseline(small_cluster):
    res = small_cluster
    base = res.by_name("baseline").timing_s
    for v in res.variants:
        t = v.timing_s
        assert t["step"] == pytest.approx(t["gen"] + t["inference"] + t["train"] + t["realloc"])
        assert v.samples_per_s == pytest.approx(64 / t["step"])
    assert res.by_name("intra-stage").timing_s["train"] <= base["train"]
    assert res.by_name("all").timing_s["step"] <= base["step"]
    assert res.by_name("all").timing_s["train"] <= res.by_name("realloc").timing_s["train"]
    assert res.by_name("baseline").timing_s["realloc"] == 0.0
    flat = res.by_name("baseline").layouts
    assert len(set(flat.values())) == 1  # flattening: one layout for every call


def _write_config(tmp_path, **ppo):
    ppo = {"rollout_batch_size": 64, "mini_batch_size": 16, "micro_batch_size": 1, **ppo}
    text = ("model: {preset: llama-7b}\ndata: {max_prompt_len: 128}\n"
            "generation: {max_new_tokens: 256, max_batch_size: 64}\n"
            f"ppo: {json.dumps(ppo)}\ncluster: {{devices: 16}}\n")
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    return path


def test_cli_json_and_table(tmp_path):
    cfg = _write_config(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["simulate", "--config", str(cfg), "--json", "--schedule-time", "0.3",
                              "--lengths", "lognormal:32,256"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    names = [v["name"] for v in data["variants"]]
    assert names == ["baseline", "realloc", "inter-stage", "intra-stage", "all"]
    for v in data["variants"]:
        for key in ("gen", "inference", "train", "realloc", "step"):
            assert v[f"timing_s/{key}"] >= 0
        assert v["perf/throughput"] > 0
    assert data["cluster"]["gpus"] == 16 and data["workload"]["batch_size"] == 64
    table = runner.invoke(app, ["simulate", "--config", str(cfg), "--model", "13b",
                                "--cluster", "32", "--schedule-time", "0.2"])
    assert table.exit_code == 0, table.output
    assert "baseline" in table.stdout and "samples/s" in table.stdout


@pytest.mark.parametrize("args, words", [
    (["--model", "99b"], "--model"),
    (["--cluster", "3"], "3 GPUs"),
    (["--lengths", "bogus:1"], "lengths"),
    (["--schedule-time", "-1"], "--schedule-time"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, words):
    cfg = _write_config(tmp_path)
    out = CliRunner().invoke(app, ["simulate", "--config", str(cfg)] + args)
    assert out.exit_code == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]


def test_cli_missing_config(tmp_path):
    out = CliRunner().invoke(app, ["simulate", "--config", str(tmp_path / "none.yaml")])
    assert out.exit_code == 2 and "does not exist" in out.stderr


def test_runtime_overheads_enter_the_stage_times_as_documented():
    from fusedrl.sim.iteration import Variant
    from fusedrl.sim.overheads import RuntimeOverheads

    rng = np.random.default_rng(0)
    out = rng.integers(4, 32, 16)
    # 16 samples, mini-batch 8, micro-batch 4; one device: dp1tp1pp1 for every call
    work = Workload(np.full(16, 6), out, out[::-1].copy(), 32, 8, 4)
    ov = RuntimeOverheads(gen_call_s=0.5, engine_step_s=0.01, infer_call_s=0.2,
                          infer_microbatch_s=0.03, train_call_s=0.7, train_microbatch_s=0.05,
                          optimizer_step_s=0.11)
    base = Variant("baseline", False, False, False)

    def timing(o):
        sim = IterationSimulator(TINY, TINY, work, 1, schedule_time_s=0.0, overheads=o)
        return sim, sim.run([base]).by_name("baseline").timing_s

    sim0, t0 = timing(RuntimeOverheads())
    # engine_step_s joins the per-step prefill/decode overheads of the roofline ...
    sim1, t1 = timing(replace(ov, engine_step_s=0.0))
    sim2, _ = timing(ov)
    assert sim2.actor.eff.overhead_decode_s == pytest.approx(Efficiency().overhead_decode_s + 0.01)
    assert sim2.actor.eff.overhead_prefill_s == pytest.approx(Efficiency().overhead_prefill_s + 0.01)
    # ... the others are added to the stage times: gen + call
    assert t1["gen"] == pytest.approx(t0["gen"] + 0.5)
    # inference: call + 3 models x ceil(16 / (4 * dp 1)) = 4 micro-batches
    assert t1["inference"] == pytest.approx(t0["inference"] + 0.2 + 3 * 4 * 0.03)
    # train (pp=1, 1F1B one model after the other): 2 steps (16 / 8), 2 micro-batches per
    # step (8 / 4): call + steps * (2 models * (2 micro * 0.05 + optimizer 0.11))
    assert t1["train"] == pytest.approx(t0["train"] + 0.7 + 2 * 2 * (2 * 0.05 + 0.11))
    assert t1["realloc"] == t0["realloc"] == 0.0
    # all zero by default: the cluster-scale results are unchanged
    assert RuntimeOverheads() == RuntimeOverheads(*([0.0] * 7))
    with pytest.raises(ValueError, match="optimizer_step_s"):
        RuntimeOverheads(optimizer_step_s=-1.0)
