"""Device choice (cluster.accelerator), device memory accounting, the single-device
trainer on an explicit device, and the GPU check script.

The CUDA tests skip without a CUDA device; they compare the CUDA path with the CPU one."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedrl.config import ConfigError, load_config
from fusedrl.models.build import build_model
from fusedrl.models.config import PRESETS
from fusedrl.runtime import memory

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
         "generation.max_new_tokens=6", "data.num_prompts=32", "ppo.ppo_epochs=1"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
TINY = PRESETS["tiny"]


# --------------------------------------------------------------------- config


def test_accelerator_auto_picks_cuda_when_torch_sees_a_gpu(monkeypatch):
    # the default: resolved on load to what this process's torch sees
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert load_config(None).cluster.accelerator == expected
    for seen, kind in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda seen=seen: seen)
        assert load_config(None).cluster.accelerator == kind
        assert load_config(None, ["cluster.accelerator=auto"]).cluster.accelerator == kind
        # an explicit kind is kept
        assert load_config(None, ["cluster.accelerator=cpu"]).cluster.accelerator == "cpu"


def test_accelerator_rejects_unknown_values():
    with pytest.raises(ConfigError,
                       match="cluster.accelerator='tpu': must be auto, cpu or cuda"):
        load_config(None, ["cluster.accelerator=tpu"])
    # several CUDA devices are valid as a file: the Ray runtime checks the GPUs it finds
    # (tests/test_runtime_device.py)
    assert load_config(None, ["cluster.accelerator=cuda", "cluster.devices=2"]).cluster.devices == 2


@no_cuda
def test_cuda_without_cuda_is_a_config_error_at_trainer_construction():
    from fusedrl.runtime.launch import make_trainer

    cfg = load_config(None, SMALL + ["cluster.accelerator=cuda"])  # valid as a file
    with pytest.raises(ConfigError, match="cluster.accelerator='cuda': no CUDA device"):
        make_trainer(cfg)


@no_cuda
def test_cli_reports_cuda_without_cuda_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fusedrl", "train", "--out", str(tmp_path / "o"),
                        "--set", "cluster.accelerator=cuda"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "cluster.accelerator" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------- memory


def test_activation_bytes_count_saved_tensors_once():
    # Linear saves its input x [5, 8]; ReLU saves its output [5, 16], which the second
    # Linear saves again as its input (one storage); weights are not activations.
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert memory.activation_bytes_per_microbatch(net, torch.randn(5, 8)) == 4 * (5 * 8 + 5 * 16)
    net.requires_grad_(False)
    assert memory.activation_bytes_per_microbatch(net, torch.randn(5, 8)) == 0


def test_activation_bytes_grow_linearly_with_microbatch_tokens():
    model = build_model(TINY, "lm", seed=0)
    gen = torch.Generator().manual_seed(0)

    def act(b, t):
        return memory.activation_bytes_per_microbatch(
            model, torch.randint(0, TINY.vocab_size, (b, t), generator=gen))

    by_rows = [act(b, 16) for b in (1, 2, 3, 4)]
    assert by_rows[0] > 0
    assert len({y - x for x, y in zip(by_rows, by_rows[1:])}) == 1  # affine in rows
    assert by_rows[3] == pytest.approx(4 * by_rows[0], rel=0.01)
    by_len = [act(2, t) for t in (8, 16, 32)]
    assert by_len[2] - by_len[1] == pytest.approx(2 * (by_len[1] - by_len[0]), rel=0.01)
    assert not any(p.grad is not None for p in model.parameters())  # nothing ran backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_capacity_matches_the_engine_cache(dtype):
    model = build_model(TINY, "lm", seed=0, dtype=dtype)
    nbytes = torch.finfo(dtype).bits // 8
    per_token = memory.kv_bytes_per_token(TINY, nbytes)
    assert per_token == 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * nbytes
    # Plenty of memory: C is the slot cache the engine preallocates.
    cap = memory.kv_capacity_bytes(TINY, 1 << 40, dtype_bytes=nbytes, max_slots=3, max_len=20)
    assert cap == model.new_cache(3, 20).nbytes()
    assert memory.kv_capacity_tokens(TINY, cap, dtype_bytes=nbytes) == 60


def test_kv_capacity_from_free_memory():
    per = memory.kv_bytes_per_token(TINY, 2)
    free = 100 * per + per // 2
    assert memory.kv_capacity_bytes(TINY, free, dtype_bytes=2, utilization=1.0) == 100 * per
    assert memory.kv_capacity_bytes(TINY, free, dtype_bytes=2, utilization=0.5) == 50 * per
    assert memory.kv_capacity_bytes(TINY, free, dtype_bytes=2, utilization=1.0,
                                    weight_bytes=40 * per) == 60 * per
    assert memory.kv_capacity_bytes(TINY, per, dtype_bytes=2, weight_bytes=2 * per) == 0
    # tp beyond the kv heads: every rank keeps one head.
    assert memory.kv_bytes_per_token(TINY, 2, tp=4) == per // TINY.num_kv_heads
    with pytest.raises(ValueError, match="utilization"):
        memory.kv_capacity_bytes(TINY, free, dtype_bytes=2, utilization=0)
    with pytest.raises(ValueError, match="max_slots and max_len"):
        memory.kv_capacity_bytes(TINY, free, dtype_bytes=2, max_slots=4)


def test_device_memory_on_cpu():
    free, total = memory.device_memory("cpu")
    assert 0 < free <= total
    half_free, half_total = memory.device_memory("cpu", share=2)
    assert half_total == total // 2 and half_free < free
    with pytest.raises(ValueError, match="share"):
        memory.device_memory("cpu", share=0)


def test_max_inflight_microbatches():
    assert memory.max_inflight_microbatches(10, 3) == 3
    assert memory.max_inflight_microbatches(2, 3) == 0
    with pytest.raises(ValueError, match="act_bytes"):
        memory.max_inflight_microbatches(10, 0)


def test_measured_memory_cap_bounds_the_fused_schedule():
    from fusedrl.pipeline.fused_plan import MEM_UNIT, build_problem, memory_cap
    from fusedrl.scheduler.pipeline_schedule import solve

    mib = MEM_UNIT
    profile = {"actor": [(0.010, 0.020, 4 * mib), (0.010, 0.020, 2 * mib)],
               "critic": [(0.008, 0.016, 3 * mib), (0.008, 0.016, 1 * mib)]}
    problem = build_problem((1, 0), (6, 6), profile)
    assert memory_cap(problem, None) is None
    cap = memory_cap(problem, [20 * mib, 9 * mib])
    assert cap == 9.0  # the smallest node's free memory, in the problem's MiB
    result = solve(problem, time_limit=0.5, seed=0, memory_cap=cap).to_dict()
    assert 0 < result["peak_memory"] <= cap
    # Node 1 runs actor stage 1 (2 MiB) and critic stage 0 (3 MiB): 2.5 MiB cannot
    # hold one critic micro-batch.
    with pytest.raises(ValueError, match="node 1 has 2.5 MiB free"):
        memory_cap(problem, [20 * mib, 2.5 * mib])
    with pytest.raises(ValueError, match="2 nodes"):
        memory_cap(problem, [20 * mib])


# -------------------------------------------------------------------- trainer


def _comparable(metrics):
    from test_faults import TIMED  # the measured metrics, not a function of the seed

    return {k: v for k, v in metrics.items() if not k.startswith(TIMED)}


def test_explicit_cpu_trainer_equals_the_default():
    from fusedrl.devices import device_of
    from fusedrl.runtime.launch import make_trainer

    runs = []
    for extra in ([], ["cluster.accelerator=cpu"]):
        cfg = load_config(None, SMALL + extra)
        assert device_of(cfg) == torch.device("cpu")
        t = make_trainer(cfg)
        try:
            assert t.device == torch.device("cpu")
            assert all(p.device.type == "cpu" for p in t.stages.models.actor.parameters())
            runs.append([_comparable(t.step()) for _ in range(2)])
        finally:
            t.close()
    assert runs[0] == runs[1]


def test_synchronize_and_timer_on_cpu():
    from fusedrl.devices import resolve, synchronize, timer

    assert resolve("cpu") == torch.device("cpu")
    synchronize("cpu")
    a = timer("cpu")
    assert timer(torch.device("cpu")) >= a


@cuda
def test_trainer_on_cuda_matches_cpu():
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.update import minibatch_schedule

    cpu = make_trainer(load_config(None, SMALL))
    gpu = make_trainer(load_config(None, SMALL + ["cluster.accelerator=cuda"]))
    try:
        assert gpu.device.type == "cuda"
        for a, b in zip(cpu.stages.models.critic.parameters(),
                        gpu.stages.models.critic.parameters()):
            assert b.is_cuda and torch.equal(a, b.cpu())  # same init on every device
        idx = gpu.prompt_indices(0)
        requests, params = gpu.requests(0, idx), gpu.sampling_params()
        want, got = cpu.stages.rollout.run(requests, params), gpu.stages.rollout.run(
            requests, params)
        assert next(iter(gpu.stages.models.engine.cache.k.values())).is_cuda
        torch.testing.assert_close(got.batch.input_ids.cpu(), want.batch.input_ids)
        for name in ("old_logp", "ref_logp", "values"):
            w, g = getattr(want, name), getattr(got, name)
            assert g.is_cuda
            torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4)
        # One PPO update on the same data and advantages: same losses and weights.
        batch, old, values = want.batch, want.old_logp, want.values
        adv, ret = torch.randn_like(old) * batch.response_mask, values + 0.1
        targets = {"old_logp": old, "values": values, "advantages": adv, "returns": ret}
        schedule = minibatch_schedule(len(batch), cpu.config.ppo, 0, 0)
        s_cpu = cpu.stages.update.train(batch, targets, schedule)
        dev = gpu.device
        s_gpu = gpu.stages.update.train(batch.to(dev), {k: v.to(dev) for k, v in
                                                        targets.items()}, schedule)
        for key in ("actor/pg_loss", "critic/vf_loss", "actor/grad_norm"):
            assert s_gpu[key] == pytest.approx(s_cpu[key], rel=1e-3, abs=1e-5), key
        for a, b in zip(cpu.stages.models.actor.parameters(),
                        gpu.stages.models.actor.parameters()):
            torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-4)
        m = gpu.step()  # the whole iteration on the device; metrics are floats
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
    finally:
        cpu.close()
        gpu.close()


@cuda
def test_gae_on_cuda_matches_cpu():
    from fusedrl.kernels.gae import compute_gae

    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(64, 300, generator=g), torch.randn(64, 300, generator=g)
    lens = torch.randint(1, 301, (64,), generator=g)
    mask = (torch.arange(300)[None, :] < lens[:, None]).float()
    want = compute_gae(rewards, values, mask, 0.99, 0.95)
    got = compute_gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.95)
    for w, x in zip(want, got):
        assert x.is_cuda
        torch.testing.assert_close(x.cpu(), w, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ gpu check


def test_gpu_check_script_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--device", "cpu",
                        "--quick", "--peak-tflops", "0.5", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["info"]["device"] == "cpu" and res["quick"]
    gen, train, gae = res["generation"], res["train"], res["gae"]
    assert gen["tokens_per_s"] == pytest.approx(gen["batch"] * gen["new_tokens"] / gen["seconds"])
    assert gen["engine_kv_cache_bytes"] > 0 and gen["kv_capacity_tokens"] > 0
    assert train["peak_flops"] == 0.5e12
    assert train["mfu"] == pytest.approx(
        6 * train["trained_params"] * train["train_tokens"] / train["train_seconds"] / 0.5e12)
    assert train["activation_bytes_per_microbatch"] > 0
    assert train["max_inflight_microbatches"] >= 1
    assert set(gae["seconds"]) >= {"torch"} and all(v > 0 for v in gae["seconds"].values())
    assert max(gae["max_abs_diff"].values()) < 1e-3
