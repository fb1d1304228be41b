"""Starting or joining Ray, the Ray resources of a worker, and choosing the trainer for a
config.

One worker is one device: a CPU core (``cluster.accelerator: cpu``) or a GPU (``cuda``:
the worker asks Ray for ``num_gpus=1``, and the cluster must have ``cluster.devices``
GPUs, checked by :func:`check_gpus` before any worker starts)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

LOCAL_PATH_NOTE = ("fast path: cluster.devices == 1 and every placement dp1tp1pp1@0 runs the "
                   "in-process single-device trainer")


def ensure_ray(address: str, num_devices: int) -> bool:
    """Join the Ray cluster at ``address`` (``ray start --head`` printed it), or start a
    local instance with a CPU per device. Returns True when this call started or joined
    Ray (and the caller should shut it down), False when Ray was already initialised
    (tests share one session)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        probe_ray_address(address)  # ray.init retries an unreachable address for minutes
        ray.init(address=address, log_to_driver=True)
    else:
        clean_dead_local_rays()
        ray.init(num_cpus=max(num_devices, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True)
        record_local_ray()
    return True


def local_ray_records() -> Path:
    """Where drivers record the local Ray instances they started (one JSON per driver);
    ``FUSEDRL_LOCAL_RAY_RECORDS`` overrides it."""
    return Path(os.environ.get("FUSEDRL_LOCAL_RAY_RECORDS")
                or Path(tempfile.gettempdir()) / f"fusedrl-local-ray-{os.getuid()}")


def _alive(pid: int, started: float) -> bool:
    """``pid`` is still the process that started at ``started`` (not a reused PID)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def record_local_ray() -> None:
    """Record the processes of the local Ray instance this driver just started (its
    descendants running Ray). When the driver is SIGKILLed, Ray's GCS and raylet die with
    it but its dashboard and runtime-env agents linger (they block up to 60 s reporting
    the raylet's death to the dead GCS); :func:`clean_dead_local_rays` then ends them."""
    import psutil

    me = psutil.Process()
    procs = []
    for child in me.children(recursive=True):
        try:
            if any("ray" in part for part in child.cmdline()):
                procs.append([child.pid, child.create_time()])
        except psutil.Error:
            pass
    try:
        root = local_ray_records()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / f"{me.pid}.json").write_text(
            json.dumps({"driver": [me.pid, me.create_time()], "processes": procs}))
    except OSError:  # only a clean-up aid: never fail a run for it
        pass


def clean_dead_local_rays() -> list[int]:
    """Kill what local Ray instances of dead drivers left behind (the processes recorded
    by :func:`record_local_ray`, matched by PID and start time) and drop their records;
    returns the PIDs killed. Records of live drivers are left alone."""
    import psutil

    killed: list[int] = []
    root = local_ray_records()
    if not root.is_dir():
        return killed
    for rec in root.glob("*.json"):
        try:
            data = json.loads(rec.read_text())
            driver, procs = data["driver"], data["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            rec.unlink(missing_ok=True)
            continue
        if _alive(*driver):
            continue
        for pid, started in procs:
            if _alive(pid, started):
                try:
                    psutil.Process(pid).kill()
                    killed.append(pid)
                except psutil.Error:
                    pass
        rec.unlink(missing_ok=True)
    return killed


def probe_ray_address(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`~fusedrl.config.ConfigError` within ``timeout`` seconds unless a
    Ray cluster answers at ``address`` (``HOST:PORT`` of its GCS, or ``ray://HOST:PORT``
    of a Ray Client server): ``ray.init`` itself retries an unreachable address for
    minutes, printing a warning every few seconds. The GCS is asked its cluster id over
    gRPC (``NodeInfoGcsService.GetClusterId``), so a port where something else listens
    is refused too. ``auto`` and ``local`` are left to Ray."""
    import grpc

    from fusedrl.config import ConfigError

    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    target = address.split("://", 1)[-1].rstrip("/")
    where = f"config key cluster.address={address!r} (--cluster)"
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{where}: expected HOST:PORT, as `ray start --head` prints")
    channel = grpc.insecure_channel(target)
    try:
        if client:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ConfigError(f"{where}: no Ray Client server answered within {timeout:g} s"
                          ) from None
    except grpc.RpcError as e:
        code = e.code()
        if code != grpc.StatusCode.UNAUTHENTICATED:  # a Ray cluster with token auth
            detail = " ".join((e.details() or "").split()).split(";")[0].split(": [")[0]
            if code == grpc.StatusCode.UNAVAILABLE:
                problem = f"cannot reach it ({detail}); is `ray start --head` running there?"
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                problem = f"no answer within {timeout:g} s; is the head node up?"
            else:
                problem = f"something answers there, but not a Ray cluster ({code.name})"
            raise ConfigError(f"{where}: {problem}") from None
    finally:
        channel.close()


def worker_options(accelerator: str) -> dict:
    """Ray actor options of one worker: a CPU core, plus a whole GPU on ``cuda`` (Ray then
    sets the actor's ``CUDA_VISIBLE_DEVICES`` to it, :func:`fusedrl.devices.worker_device`)."""
    if accelerator == "cuda":
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": 1}


def check_gpus(cluster, resources: dict) -> None:
    """A :class:`~fusedrl.config.ConfigError` when ``cluster.accelerator: cuda`` asks for
    more GPUs (one per device) than the Ray cluster's ``resources``
    (``ray.cluster_resources()``) has: Ray would otherwise leave the extra workers
    pending forever."""
    from fusedrl.config import ConfigError

    if cluster.accelerator != "cuda":
        return
    found = resources.get("GPU", 0)
    if found < cluster.devices:
        raise ConfigError(f"config keys cluster.accelerator=cuda, cluster.devices="
                          f"{cluster.devices}: the Ray cluster has {found:g} GPUs, one per "
                          f"device is needed")


def is_single_device(config) -> bool:
    return config.cluster.devices == 1 and config.placement.is_trivial()


def stage_names(config) -> dict[str, str]:
    """The registry names (:mod:`fusedrl.stages`) of the rollout, update and weight sync
    of a run: the single-device ones, or the Ray runtime's picked by the fusion
    switches (``fusion.interstage`` resolved by :func:`fusedrl.validate.interstage_enabled`)."""
    from fusedrl.validate import interstage_enabled

    if is_single_device(config):
        return {"rollout": "local", "update": "local", "weight_sync": "local"}
    from fusedrl.validate import uses_critic

    return {"rollout": "interstage" if interstage_enabled(config) else "ray",
            "update": "fused" if config.fusion.intrastage and uses_critic(config) else "1f1b",
            "weight_sync": "realloc"}


def make_trainer(config, setup=None, stages: dict[str, str] | None = None):
    """The :class:`~fusedrl.trainer.Trainer` of ``config``: the single-device stages for
    one device with trivial placements, else the Ray runtime's (every call on its own
    placement). Both honour ``cluster.accelerator``. ``stages`` overrides registry names
    (a user's own rollout, update or weight sync)."""
    from fusedrl.devices import peak_memory_metrics
    from fusedrl.stages import StageContext, build_stage
    from fusedrl.trainer import Stages, Trainer, build_setup

    from fusedrl.validate import uses_critic

    setup = setup or build_setup(config)
    names = {**stage_names(config), **(stages or {})}
    if config.fusion.intrastage and not uses_critic(config):
        print(f"fusion.intrastage: off, algorithm.adv_estimator="
              f"{config.algorithm.adv_estimator!r} trains no critic to fuse the actor with",
              file=sys.stderr)
    if is_single_device(config):
        from fusedrl.local import LocalModels

        models = LocalModels(config, setup)
        ctx = StageContext(config, setup, models.events, models=models)
        built = {k: build_stage(k, n, ctx) for k, n in names.items()}
        return Trainer(config, setup, Stages(
            built["rollout"], built["update"], built["weight_sync"],
            take_events=models.events.take, devices=[0], runtime="single",
            device=models.device, close=built["rollout"].close, models=models,
            peak_memory=lambda: peak_memory_metrics(models.device)))

    import fusedrl.interstage  # noqa: F401 - registers the stages
    import fusedrl.runtime.stages  # noqa: F401
    from fusedrl.runtime.cluster import RayCluster

    cluster = RayCluster(config, setup, serve=names["rollout"] == "interstage")
    try:
        ctx = StageContext(config, setup, None, cluster=cluster)
        built = {k: build_stage(k, n, ctx) for k, n in names.items()}
    except BaseException:
        cluster.close()
        raise
    return Trainer(config, setup, Stages(
        built["rollout"], built["update"], built["weight_sync"],
        take_events=cluster.take_events, devices=list(cluster.devices), runtime="ray",
        placements=dict(cluster.spec.placements), close=cluster.close, cluster=cluster,
        peak_memory=cluster.peak_memory))
