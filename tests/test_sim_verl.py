"""The cost model against a published real run (issue 18): verl's PPO on GSM8K with
Qwen2.5-0.5B-Instruct on one GPU (``configs/verl-gsm8k-qwen05b.yaml``), and the
terms the check added to the roofline (serial elementwise kernels, the host's launch
floor, per-sequence engine work, wave quantization, padding, FSDP weight traffic).

The fraction test is a model check, not a timing test: the published figures are
read from the config's ``simulate.reference`` section.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fusedrl.cli.main import app
from fusedrl.cli.simulate import reference_check, simulator_from_config
from fusedrl.layout import ParallelLayout
from fusedrl.models.config import PRESETS
from fusedrl.sim.iteration import VARIANTS, Workload
from fusedrl.sim.roofline import (FUSED_KERNELS, HARDWARE, HF_EAGER_KERNELS, Efficiency, Roofline,
                                  Work)
from fusedrl.sim.systems import SYSTEMS, VERL_2024

VERL = Path(__file__).resolve().parents[1] / "configs" / "verl-gsm8k-qwen05b.yaml"
QWEN = PRESETS["qwen2.5-0.5b"]
A100 = HARDWARE["A100-SXM4-80GB"]
ONE = ParallelLayout()


def test_verl_stage_fractions_are_within_tolerance_of_the_published_run():
    sim, profile, section = simulator_from_config(VERL, schedule_time=0.0)
    assert profile is VERL_2024 and sim.hw.name == "A100-SXM4-80GB"
    base = sim.run(VARIANTS[:1]).by_name("baseline")
    stages = base.stages
    assert set(stages) == {"gen", "ref", "values", "update_critic", "update_actor", "realloc"}
    # the stages partition the unfused iteration (one GPU: nothing overlaps)
    assert sum(stages.values()) == pytest.approx(base.timing_s["step"], rel=1e-9)
    check = reference_check(stages, section["reference"])
    ratios = {k: r["predicted_over_published"] for k, r in check["stages"].items()}
    assert set(ratios) == {"gen", "ref", "values", "update_critic", "update_actor"}
    assert check["tolerance"] == 0.25
    assert check["all_within_tolerance"], ratios
    for k, r in ratios.items():
        assert abs(r - 1) <= 0.25, (k, r)


def test_cli_json_has_stages_system_and_reference_check():
    out = CliRunner().invoke(app, ["simulate", "--config", str(VERL), "--json",
                                   "--schedule-time", "0"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    base = data["variants"][0]
    assert base["name"] == "baseline"
    assert {"gen", "ref", "values", "update_critic", "update_actor"} <= set(base["stages"])
    assert "stages" not in data["variants"][2]  # inter-stage: gen and inference overlap
    assert data["system"]["name"] == "verl-2024" and data["system"]["padding"] == "max"
    rows = data["reference_check"]["stages"]
    assert rows["gen"]["predicted_fraction_of_gen"] == pytest.approx(1.0)
    assert rows["ref"]["published_fraction_of_gen"] == pytest.approx(5.4 / 17.9)
    assert rows["ref"]["predicted_s"] == pytest.approx(base["stages"]["ref"])


@pytest.mark.parametrize("text, words", [
    ("simulate: {bogus: 1}\n", "simulate.bogus"),
    ("simulate: {system: nope}\n", "simulate.system"),
    ("simulate: {hardware: tpu}\n", "simulate.hardware"),
    ("simulate: {prompt_len: -3}\n", "simulate.prompt_len"),
    ("simulate: {reference: {stages_s: {gen: 1, nope: 2}}}\n", "stages_s.nope"),
])
def test_bad_simulate_section_is_one_line_exit_2(tmp_path, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny}\nppo: {rollout_batch_size: 8, mini_batch_size: 8, "
                   "micro_batch_size: 4}\n" + text)
    out = CliRunner().invoke(app, ["simulate", "--config", str(cfg), "--schedule-time", "0"])
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines


def test_the_rest_of_a_config_with_a_simulate_section_loads_unchanged(tmp_path):
    from fusedrl.cli.simulate import split_simulate_section
    from fusedrl.config import load_config

    section, overrides = split_simulate_section(VERL)
    plain = tmp_path / "plain.yaml"
    text = VERL.read_text()
    plain.write_text(text[:text.index("\nsimulate:")])
    assert section["system"] == "verl-2024"
    assert load_config(None, overrides) == load_config(plain)
    assert split_simulate_section(plain) == ({}, None)


# -- the terms the check added ------------------------------------------------------------


def test_host_launches_floor_small_passes_and_not_large_ones():
    roof = Roofline(QWEN, A100, VERL_2024.efficiency_for(), kernels=HF_EAGER_KERNELS)
    small = sum(roof.forward_works(1, 64, ONE), Work())
    large = sum(roof.forward_works(8, 1536, ONE), Work())
    assert small.kernels == large.kernels == 24 * 50 + 30
    assert roof.host_bound(small, "infer") and not roof.host_bound(large, "infer")
    eff = roof.eff
    assert roof.time_s(small, "infer") == pytest.approx(
        small.kernels * eff.launch_infer_s + eff.overhead_infer_s)
    # per token, the small pass is dearer: that is micro-batch efficiency
    assert roof.time_s(small, "infer") / 64 > roof.time_s(large, "infer") / (8 * 1536)


def test_elementwise_kernels_add_to_the_matmuls_roofline():
    eff = Efficiency()
    roof = Roofline(QWEN, A100, eff)
    w = Work(flops=1e12, bytes=1e9, serial_bytes=4e9, kernels=10)
    bw = A100.hbm_bandwidth * eff.bw_eff_infer
    compute = 1e12 / (A100.peak_flops * eff.mfu_infer)
    assert roof.time_s(w, "infer") == pytest.approx(compute + 4e9 / bw + eff.overhead_infer_s)
    # transformers' eager modules move more bytes per token than fused kernels
    eager = Roofline(QWEN, A100, eff, kernels=HF_EAGER_KERNELS).layers_work(1, 1000, 0, 1)
    fused = Roofline(QWEN, A100, eff, kernels=FUSED_KERNELS).layers_work(1, 1000, 0, 1)
    assert eager.serial_bytes > 2.5 * fused.serial_bytes
    assert eager.flops == fused.flops and eager.bytes == fused.bytes


def test_wave_quantization_charges_the_partial_last_wave():
    roof = Roofline(QWEN, A100)
    # 6144 x 896 output: 48 x 7 = 336 tiles on 108 SMs -> 4 waves, 432 tile slots
    idle = roof._idle_flops(6144, 896, 896)
    assert idle == pytest.approx((432 - 336) / 336 * 2 * 6144 * 896 * 896)
    assert roof._idle_flops(128 * 12, 128 * 9, 896) == 0.0  # 12 x 9 = 108 tiles: one wave
    # one more column: 12 x 10 tiles, two waves, the second nearly empty
    assert roof._idle_flops(128 * 12, 128 * 9 + 1, 896) == pytest.approx(
        2 * 108 * 128 * 128 * 2 * 896 - 2 * 128 * 12 * (128 * 9 + 1) * 896)
    assert roof._idle_flops(64, 896, 896) == 0.0  # fewer tiles than SMs: split-K fills them
    # fused q/k/v and gate/up (1152 and 9728 wide) waste less than separate projections
    sep = Roofline(QWEN, A100, kernels=HF_EAGER_KERNELS).layers_work(1, 6144, 0, 1)
    fus = Roofline(QWEN, A100, kernels=FUSED_KERNELS).layers_work(1, 6144, 0, 1)
    assert 0 < fus.idle_flops < sep.idle_flops < 0.25 * sep.flops


def test_padding_modes_and_their_errors():
    out = np.array([10, 50, 20, 30])
    w = Workload(np.full(4, 6), out, out, 64, 4, 2, padding="max", pad_to=70)
    assert w.padded_len(2) == 70.0
    assert replace(w, padding="none").padded_len(2) == w.mean_seq_len
    mb = replace(w, padding="micro_batch")
    assert mb.padded_len(2) == pytest.approx((2 * 56 + 2 * 36) / 4)
    with pytest.raises(ValueError, match="padding='zero'"):
        replace(w, padding="zero")
    with pytest.raises(ValueError, match="pad_to=40"):
        replace(w, pad_to=40)


def test_tied_embeddings_count_once():
    roof = Roofline(QWEN, A100)
    emb = QWEN.vocab_size * QWEN.hidden_size
    assert roof.params_per_device(ONE, "lm") == pytest.approx(24 * roof.layer_params(1) + emb)
    # the stages also count the final norm
    assert sum(roof.stage_params(ONE, "lm")) == pytest.approx(
        roof.params_per_device(ONE, "lm") + QWEN.hidden_size)
    untied = Roofline(replace(QWEN, tie_word_embeddings=False), A100)
    assert untied.params_per_device(ONE, "lm") - roof.params_per_device(ONE, "lm") == emb


def test_fsdp_weight_traffic_per_pass():
    roof = Roofline(QWEN, A100, kernels=HF_EAGER_KERNELS)
    params = sum(roof.stage_params(ONE, "lm"))
    trained = sum(roof.forward_works(4, 256, ONE), Work()).serial_bytes
    frozen = sum(roof.forward_works(4, 256, ONE, frozen=True), Work()).serial_bytes
    assert trained - frozen == pytest.approx(params * (14 - 4))
    fwd, bwd = roof.train_works(4, 256, ONE)
    body = fwd[0].serial_bytes - 14 * params
    # backward: twice the activations' traffic, one more gather (14) and the reduction (26)
    assert bwd[0].serial_bytes == pytest.approx(2 * body + (14 + 26) * params)
    _, bwd_r = roof.with_recompute(True).train_works(4, 256, ONE)
    assert bwd_r[0].serial_bytes == pytest.approx(3 * body + (2 * 14 + 26) * params)
    fused = Roofline(QWEN, A100, kernels=FUSED_KERNELS)  # persistent bf16 weights: none
    assert fused.unshard_work(ONE, "lm", FUSED_KERNELS.unshard_bytes_trained)[0].serial_bytes == 0


def test_engine_work_per_sequence_is_added_to_each_decode_step():
    eff = VERL_2024.efficiency_for()
    roof = Roofline(QWEN, A100, eff, gen_kernels=VERL_2024.gen_kernels)
    one, many = roof.decode_step_s(1, 300, ONE), roof.decode_step_s(129, 129 * 300, ONE)
    # both host-bound on launches (no CUDA graphs): the difference is the bookkeeping
    assert roof.host_bound(sum(roof.decode_works(1, 300, ONE), Work()), "decode")
    assert many - one >= 128 * eff.host_per_seq_decode_s
    cost = roof.gen_cost_model(ONE, max_batch=256, prompt_len=105, max_new_tokens=512,
                               kv_capacity_bytes=30e9)
    assert cost.decode_per_seq_s == pytest.approx(eff.host_per_seq_decode_s, rel=0.2)


def test_weight_sync_enters_the_generation_stage():
    sync = VERL_2024.weight_sync_s(QWEN, A100)
    tensors = 9 * 24 + 2
    assert sync == pytest.approx(tensors * 1e-3 + QWEN.num_params() * 6 / A100.hbm_bandwidth)
    assert SYSTEMS["rlhfuse"].weight_sync_s(QWEN, A100) == 0.0
    assert VERL_2024.overheads(QWEN, A100).gen_call_s == sync
    assert math.isclose(SYSTEMS["rlhfuse"].efficiency_for().mfu_train, Efficiency().mfu_train)
