"""The Ray runtime's device path (cluster.accelerator): collective backend per
accelerator, GPU count against Ray, per-worker device memory, the measured KV capacity C
of inter-stage fusion (RLHFuse §4) and the measured memory cap of fused training (§5),
point-to-point channels, moving Ray objects between the controller and a device.

The CPU tests run the same code paths the GPU runtime runs; the CUDA tests (the
2-device equivalence checks of tests/test_runtime.py with cluster.accelerator=cuda)
skip without two GPUs.
"""

from types import SimpleNamespace

import pytest
import torch

from fusedrl import devices
from fusedrl.config import ConfigError, load_config
from fusedrl.layout import Placement
from fusedrl.models.config import PRESETS
from fusedrl.runtime import memory

from test_runtime import KEYS, SMALL

TINY = PRESETS["tiny"]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


# ------------------------------------------------------------ backend and placement


def test_collective_backend_per_accelerator():
    assert devices.collective_backend("cpu") == "gloo"
    # one world: CPU tensors over gloo, CUDA tensors over NCCL
    backend = devices.collective_backend("cuda")
    assert backend == "cpu:gloo,cuda:nccl"
    assert devices.backend_for(backend, "cuda") == "nccl"
    assert devices.backend_for(backend, "cpu") == "gloo"
    with pytest.raises(ConfigError, match="cluster.accelerator='tpu'"):
        devices.collective_backend("tpu")


def test_backend_for_plain_backends():
    # the reallocation executor rejects CUDA shards unless NCCL carries them
    assert devices.backend_for("nccl", "cuda") == "nccl"
    assert devices.backend_for("nccl", "cpu") is None
    assert devices.backend_for("gloo", "cpu") == "gloo"
    assert devices.backend_for("gloo", "cuda") == "gloo"


def test_registry_creates_groups_with_the_given_backend():
    import torch.distributed as dist

    from fusedrl.runtime.dist import local_group
    from fusedrl.runtime.groups import GroupRegistry

    local_group()  # an in-process gloo world of one rank when none exists
    rank = dist.get_rank()
    reg = GroupRegistry(rank, devices.collective_backend("cpu"))
    reg.create_all([(rank,)])
    assert dist.get_backend(reg.get([rank])) == "gloo"
    with pytest.raises(KeyError, match="not created"):
        reg.channel(rank + 1, "p0act")


def test_cuda_local_index_of_the_ray_gpu():
    assert devices.cuda_local_index([3], "3") == 0  # Ray restricts visibility to the GPU
    assert devices.cuda_local_index(["5"], "2,5") == 1
    assert devices.cuda_local_index([3], None) == 3  # visibility left alone
    with pytest.raises(RuntimeError, match="no GPU"):
        devices.cuda_local_index([], "0")
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        devices.cuda_local_index([4], "0,1")


def test_worker_options_ask_ray_for_one_gpu_per_device():
    from fusedrl.runtime.launch import worker_options

    assert worker_options("cpu") == {"num_cpus": 1}
    assert worker_options("cuda") == {"num_cpus": 1, "num_gpus": 1}


def test_to_device_moves_nested_objects_and_keeps_cpu_tensors():
    from fusedrl.rollout import RolloutBatch

    t = torch.arange(4)
    batch = RolloutBatch(torch.ones(2, 3, dtype=torch.long), torch.tensor([1, 1]),
                         torch.tensor([2, 2]), torch.ones(2, 2), torch.zeros(2, 2),
                         torch.tensor([0, 1]))
    moved = devices.to_device({"a": [t, (t, 1)], "b": batch, "s": "x"}, "cpu")
    assert moved["a"][0] is t and moved["a"][1][0] is t and moved["a"][1][1] == 1
    assert isinstance(moved["a"][1], tuple) and moved["s"] == "x"
    assert isinstance(moved["b"], RolloutBatch)
    assert torch.equal(moved["b"].input_ids, batch.input_ids)
    obj = SimpleNamespace(x=t)  # not a tensor container: returned as is
    assert devices.to_host(obj) is obj
    to = devices.to_host((torch.zeros(1, dtype=torch.float64),))
    assert to[0].device.type == "cpu" and to[0].dtype == torch.float64


def test_pipeline_channels_one_group_per_pipeline_and_direction():
    from fusedrl.runtime.groups import channel_name, pipeline_channels

    actor = Placement.parse("dp1tp2pp2@0-3")
    critic = Placement.parse("dp1tp2pp2@2,3,0,1")  # reversed stages: the same pairs
    chans = pipeline_channels([actor, critic, Placement.parse("dp4tp1pp1@0-3")])
    names = {channel_name(p, g) for p in (0, 1) for g in (False, True)}
    assert len(names) == 4
    assert chans == [((0, 2), n) for n in ("p0act", "p0grad", "p1act", "p1grad")] + \
        [((1, 3), n) for n in ("p0act", "p0grad", "p1act", "p1grad")]
    with pytest.raises(ValueError, match="pipeline"):
        channel_name(2, False)


# ------------------------------------------------------------ GPU count


def test_cuda_with_several_devices_is_a_valid_config():
    cfg = load_config(None, ["cluster.accelerator=cuda", "cluster.devices=2",
                             "placement.default=dp2tp1pp1@0-1"])
    assert cfg.cluster.accelerator == "cuda" and cfg.cluster.devices == 2


def test_gpu_count_is_checked_against_the_ray_cluster():
    from fusedrl.runtime.launch import check_gpus

    cuda4 = SimpleNamespace(accelerator="cuda", devices=4)
    with pytest.raises(ConfigError, match=r"cluster.accelerator=cuda, cluster.devices=4: the "
                                          r"Ray cluster has 2 GPUs"):
        check_gpus(cuda4, {"CPU": 16.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match="has 0 GPUs"):
        check_gpus(cuda4, {"CPU": 16.0})
    check_gpus(cuda4, {"GPU": 4.0})
    check_gpus(SimpleNamespace(accelerator="cpu", devices=4), {"CPU": 4.0})


def test_too_few_gpus_fail_before_any_worker_starts(ray_session, monkeypatch):
    import ray

    from fusedrl.runtime import cluster as controller
    from fusedrl.runtime.launch import make_trainer

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started without the GPUs it needs")

    monkeypatch.setattr(controller.RemoteWorker, "options", no_workers)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    cfg = load_config(None, SMALL + ["cluster.accelerator=cuda", "cluster.devices=2",
                                     "placement.default=dp2tp1pp1@0-1"])
    with pytest.raises(ConfigError, match=r"cluster.devices=2: the Ray cluster has 1 GPUs"):
        make_trainer(cfg)


# ------------------------------------------------------------ memory


def test_worker_device_memory_is_its_share_of_the_host():
    from fusedrl.runtime.worker import Worker

    w = Worker(1, 4, "cpu")
    assert w.torch_device == torch.device("cpu")
    free, total = w.device_memory()
    want_free, want_total = memory.device_memory("cpu", share=4)
    assert total == want_total
    assert 0 < free <= total
    assert abs(free - want_free) < 0.05 * want_total  # host memory moves a little


def test_interstage_capacity_is_the_engine_geometry_when_memory_is_ample():
    dtype_bytes, slots, max_len = 4, 8, 70
    geometry = (2 * TINY.num_layers * TINY.num_kv_heads * (TINY.hidden_size // TINY.num_heads)
                * dtype_bytes * slots * max_len)  # the cost model's C before measuring
    ample = memory.kv_capacity_bytes(TINY, 1 << 40, dtype_bytes=dtype_bytes, weight_bytes=0,
                                     max_slots=slots, max_len=max_len)
    assert ample == geometry
    per = memory.kv_bytes_per_token(TINY, dtype_bytes)
    short = memory.kv_capacity_bytes(TINY, geometry // 2, dtype_bytes=dtype_bytes,
                                      weight_bytes=0, max_slots=slots, max_len=max_len)
    assert 0 < short < geometry and short % per == 0
    assert short == int(geometry // 2 * 0.9) // per * per


def test_interstage_capacity_is_measured_on_the_generation_workers(ray_session):
    import ray

    from fusedrl.runtime.launch import make_trainer

    c = load_config(None, SMALL + ["cluster.devices=2", "placement.default=dp2tp1pp1@0-1",
                                   "fusion.interstage=true"])
    t = make_trainer(c)
    try:
        max_len = c.data.max_prompt_len + c.generation.max_new_tokens
        per = memory.kv_bytes_per_token(t.stages.cluster.spec.model_config, 4)
        # a tiny model on a host with gigabytes free: the engine's slot cache bounds C
        assert t.stages.rollout.cost.kv_capacity_bytes == \
            per * max_len * c.generation.max_batch_size
        free, total = zip(*ray.get([w.device_memory.remote() for w in t.stages.cluster.workers]))
        _, host_total = memory.device_memory("cpu", share=2)  # two workers share the host
        assert all(x == host_total for x in total) and all(0 < f <= host_total for f in free)
    finally:
        t.close()


def test_pending_training_bytes_counts_gradients_and_adam_moments_until_the_first_step():
    from fusedrl.models.build import build_model

    model = build_model(TINY, "value", None, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # no buffers
    assert memory.pending_training_bytes(model, opt) == 3 * params  # grads + 2 moments
    model(torch.randint(0, TINY.vocab_size, (2, 5))).float().sum().backward()
    assert memory.pending_training_bytes(model, opt) == 2 * params
    opt.step()
    assert memory.pending_training_bytes(model, opt) == 0
    amsgrad = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    assert memory.pending_training_bytes(model, amsgrad) == 3 * params


def test_profile_stage_counts_activations_as_the_memory_module_does():
    """One counter (memory.SavedActivations) behind the fused profile and the measured
    activation bytes per micro-batch: for a stage without the loss they agree."""
    from fusedrl.models.build import build_model
    from fusedrl.models.llama import StageSpec
    from fusedrl.pipeline.fused import profile_stage

    first = build_model(TINY, "lm", None, seed=0, stage=StageSpec(range(0, 1), True, False))
    ids = torch.randint(0, TINY.vocab_size, (2, 7))
    groups = SimpleNamespace(is_first=True, is_last=False)
    _, _, mem = profile_stage(first, groups, ids, repeats=1)
    assert mem == memory.activation_bytes_per_microbatch(first, ids) > 0


def _problem(mem_bytes):
    from fusedrl.pipeline.fused_plan import build_problem

    prof = [(1e-3, 2e-3, mem_bytes)] * 2
    return build_problem((1, 0), (4, 4), {"actor": prof, "critic": prof})


def test_fused_memory_cap_binds_only_when_memory_is_short():
    from fusedrl.pipeline.fused_plan import MEM_UNIT, solver_memory_cap
    from fusedrl.scheduler.pipeline_schedule import solve

    mib = MEM_UNIT
    problem = _problem(mib)  # 1F1B side by side peaks at 3 MiB on each node
    assert solver_memory_cap(problem, None) is None
    # plenty (the CPU runtime's case): no schedule can exceed it, no cap
    assert solver_memory_cap(problem, [1 << 40, 1 << 40]) is None
    assert solver_memory_cap(problem, [8 * mib, 8 * mib]) is None  # all 4+4 micro-batches fit
    # the objective is makespan first: a measured cap that could bind is always passed on
    assert solver_memory_cap(problem, [3 * mib, 3 * mib]) == 3.0
    default = solve(problem, time_limit=0.5, seed=0).to_dict()
    # short: the smallest node's measured cap bounds the schedule
    cap = solver_memory_cap(problem, [1 << 40, 1.5 * mib])
    assert cap == 1.5
    capped = solve(problem, time_limit=0.5, seed=0, memory_cap=cap).to_dict()
    assert capped["peak_memory"] <= 1.5 < default["peak_memory"]
    assert capped["makespan"] >= default["makespan"]
    with pytest.raises(ValueError, match="less than one micro-batch"):
        solver_memory_cap(problem, [1 << 40, 0.5 * mib])


# ------------------------------------------------------------ CUDA (2 GPUs)


def _equivalent(ref_hist, hist, rel=1e-3):
    assert [m["iteration"] for m in hist] == [m["iteration"] for m in ref_hist]
    for it, (a, b) in enumerate(zip(ref_hist, hist), 1):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (it, key)
        assert b["rollout/logprob_diff_max"] < 1e-4, it


@pytest.fixture(scope="module")
def cuda_reference(tmp_path_factory):
    """The single-device trainer on GPU 0: the numbers every GPU layout must give."""
    from fusedrl.cli.train import train

    return train(load_config(None, SMALL + ["cluster.accelerator=cuda"]),
                 tmp_path_factory.mktemp("cuda_ref") / "run", show_progress=False)


# fusion.interstage=false: the dp2 layout would otherwise fuse generation and
# inference, whose per-micro-batch inference (InterStageWorker.infer_local) is checked
# on GPU separately from these layouts.
CUDA_LAYOUTS = {
    "dp2tp1pp1": ["placement.default=dp2tp1pp1@0-1", "fusion.interstage=false"],
    "dp1tp2pp1": ["placement.default=dp1tp2pp1@0-1"],
    "dp1tp1pp2": ["placement.default=dp1tp1pp2@0-1"],
    # weights resharded every iteration across GPUs by the reallocation engine (NCCL)
    "separated": ["placement.default=dp1tp1pp2@0-1", "placement.actor_gen=dp1tp2pp1@0-1",
                  "placement.critic_infer=dp2tp1pp1@0-1"],
}


@two_gpus
@pytest.mark.parametrize("name", list(CUDA_LAYOUTS))
def test_cuda_layout_matches_single_device(name, ray_session, cuda_reference, tmp_path):
    from fusedrl.cli.train import train

    cfg = load_config(None, SMALL + ["cluster.accelerator=cuda", "cluster.devices=2"]
                      + CUDA_LAYOUTS[name])
    _equivalent(cuda_reference, train(cfg, tmp_path / "run", show_progress=False))


@two_gpus
def test_cuda_fused_training_matches_sequential(ray_session, tmp_path):
    """Actor and critic stages in opposite order on two GPUs (RLHFuse §5): the fused
    schedule's messages share NCCL links, one channel per pipeline and direction."""
    from fusedrl.cli.train import train

    base = [s for s in SMALL if not s.startswith("trainer.iterations=")] + ["trainer.iterations=1", "cluster.accelerator=cuda",
                         "cluster.devices=2", "placement.default=dp1tp1pp2@0-1",
                         "placement.critic_train=dp1tp1pp2@1,0",
                         "placement.critic_infer=dp1tp1pp2@1,0"]
    seq, fused = (train(load_config(None, base + [f"fusion.intrastage={m}"]), tmp_path / m,
                        show_progress=False)[0] for m in ("false", "true"))
    for key in KEYS:
        assert fused[key] == pytest.approx(seq[key], rel=1e-4, abs=1e-6), key


@two_gpus
def test_cuda_workers_report_their_gpu_memory(ray_session):
    import ray

    from fusedrl.runtime.launch import make_trainer

    t = make_trainer(load_config(None, SMALL + [
        "cluster.accelerator=cuda", "cluster.devices=2", "placement.default=dp2tp1pp1@0-1",
        "fusion.interstage=false"]))
    try:
        mem = ray.get([w.device_memory.remote() for w in t.stages.cluster.workers])
        total = torch.cuda.mem_get_info(0)[1]
        assert all(0 < free < tot for free, tot in mem)
        assert any(tot == total for _, tot in mem)  # a whole GPU each, not a share
    finally:
        t.close()
