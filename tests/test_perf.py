"""MFU metrics: the model FLOPs of a call (6 N T per update, 2 N T per forward) over
its busy seconds, devices and a peak (given, datasheet, or measured and named so)."""

import pytest
import torch

from fusedrl.config import ConfigError, load_config
from fusedrl.models.build import build_model
from fusedrl.models.config import PRESETS
from fusedrl.perf import DATASHEET_BF16_PEAK, matmul_params, measured_peak_flops

SMALL = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=32", "ppo.ppo_epochs=2"]


@pytest.mark.parametrize("head", ["lm", "value"])
def test_matmul_params_are_the_models_projection_weights(head):
    cfg = PRESETS["tiny"]
    model = build_model(cfg, head)
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.dim() == 2 and "embed_tokens" not in name)
    assert matmul_params(cfg, head) == n


def _step(extra):
    from fusedrl.runtime.launch import make_trainer

    t = make_trainer(load_config(None, SMALL + extra))
    try:
        return t.step(), t.setup.model_config
    finally:
        t.close()


def test_mfu_against_a_given_peak():
    m, mc = _step(["cluster.peak_flops=1e12"])
    tokens = m["perf/total_num_tokens"]
    for call, k, params, timing in [("actor", 6 * 2, matmul_params(mc, "lm"), "update_actor"),
                                    ("critic", 6 * 2, matmul_params(mc, "value"), "update_critic"),
                                    ("ref", 2, matmul_params(mc, "lm"), "ref")]:
        want = k * params * tokens / (m[f"timing_s/{timing}"] * 1e12)
        assert m[f"perf/mfu/{call}"] == pytest.approx(want), call
    assert not any(k.startswith("perf/mfu_measured_peak") for k in m)


def test_cpu_mfu_is_against_a_measured_peak():
    m, _ = _step([])
    assert "perf/mfu/actor" not in m  # no datasheet peak for a CPU
    peak = m["perf/peak_flops_measured"]
    assert peak == measured_peak_flops() > 1e8  # measured once per process
    assert m["perf/mfu_measured_peak/actor"] > 0 and m["perf/mfu_measured_peak/critic"] > 0


def test_peak_flops_is_checked():
    with pytest.raises(ConfigError, match="cluster.peak_flops=-1"):
        load_config(None, ["cluster.peak_flops=-1"])
    assert DATASHEET_BF16_PEAK["H100"] > DATASHEET_BF16_PEAK["A100"]
