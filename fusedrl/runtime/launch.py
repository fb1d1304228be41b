"""Starting or joining Ray, the Ray resources of a worker, and choosing the trainer for a
config.

One worker is one device: a CPU core (``cluster.accelerator: cpu``) or a GPU (``cuda``:
the worker asks Ray for ``num_gpus=1``, and the cluster must have ``cluster.devices``
GPUs, checked by :func:`check_gpus` before any worker starts)."""

from __future__ import annotations

import os

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
        ray.init(num_cpus=max(num_devices, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True)
    return True


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


def make_trainer(config, setup=None):
    """The in-process :class:`~fusedrl.trainer.PPOTrainer` for one device with trivial
    placements, else the Ray runtime's :class:`DistributedPPOTrainer` (same interface).
    Both honour ``cluster.accelerator``: the single-device trainer runs on that device,
    the runtime's workers each take one (also with ``cluster.devices: 1`` and a
    non-trivial placement)."""
    if is_single_device(config):
        from fusedrl.trainer import PPOTrainer

        return PPOTrainer(config, setup)
    from fusedrl.runtime.controller import DistributedPPOTrainer

    return DistributedPPOTrainer(config, setup)
