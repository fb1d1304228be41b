"""Where tensors live: one place for device choice, the collective backend per device,
moving tensors across the host boundary, and synchronisation before timers.

Everything else in fusedrl is written device-generically (tensors are created on the
device of the tensors they combine with), so the same code runs on CPU in tests and on
CUDA; the CUDA-only calls are the few guarded ones below. The Ray runtime uses the same
helpers per worker: :func:`worker_device` (the GPU Ray assigned), :func:`collective_backend`
(gloo for CPU tensors, NCCL for CUDA ones) and :func:`to_device` (controller <-> worker
objects). Checkpoints need no help
here: ``save_hf_checkpoint`` writes CPU copies, and ``torch.load(map_location="cpu")``
plus the optimizers' ``load_state_dict`` put state back on the parameters' device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch


def auto_accelerator() -> str:
    """What ``cluster.accelerator: auto`` means in this process: ``cuda`` when torch sees
    a GPU (a CUDA build and a visible device), else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(accelerator: str) -> torch.device:
    """The device of ``cluster.accelerator`` (``auto``, ``cpu`` or ``cuda``); a
    :class:`~fusedrl.config.ConfigError` naming the key when it cannot be used here."""
    from fusedrl.config import ConfigError

    if accelerator == "auto":
        accelerator = auto_accelerator()
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key cluster.accelerator={accelerator!r}: no CUDA device "
                              f"is available (torch {torch.__version__}, CUDA build: "
                              f"{torch.version.cuda or 'no'})")
        return torch.device("cuda", torch.cuda.current_device())
    raise ConfigError(f"config key cluster.accelerator={accelerator!r}: must be auto, cpu or "
                      f"cuda")


def device_of(config) -> torch.device:
    """The device a :class:`~fusedrl.config.Config`'s single-device trainer runs on."""
    return resolve(config.cluster.accelerator)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a timer read after it counts that work.

    CUDA kernels run asynchronously: without this a stage's timer would stop when the
    kernels are queued and the next stage would be billed for them. A no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device's queued work finished."""
    synchronize(device)
    return time.perf_counter()


def collective_backend(accelerator: str) -> str:
    """The ``torch.distributed`` backend string of a runtime on ``accelerator``.

    CPU: ``gloo``. CUDA: torch's per-device form ``cpu:gloo,cuda:nccl``, so CUDA tensors
    (weights, activations, gradients) go over NCCL while the CPU tensors the runtime
    still exchanges (pipeline control headers, the shm transport's tokens) go over gloo,
    in one process group. Every group of the run (:mod:`fusedrl.runtime.groups`) uses it."""
    from fusedrl.config import ConfigError

    if accelerator == "cpu":
        return "gloo"
    if accelerator == "cuda":
        return "cpu:gloo,cuda:nccl"
    raise ConfigError(f"config key cluster.accelerator={accelerator!r}: must be cpu or cuda")


def backend_for(backend: str, device_type: str) -> str | None:
    """Which backend of a ``torch.distributed`` backend string (``gloo``, ``nccl`` or the
    per-device ``cpu:gloo,cuda:nccl``) carries tensors of ``device_type``; ``None`` if
    none does."""
    backend = str(backend).lower()
    if ":" in backend:
        pairs = dict(part.split(":", 1) for part in backend.split(","))
        return pairs.get(device_type)
    capable = torch.distributed.Backend.backend_capability.get(backend, [])
    return backend if device_type in capable else None


def cuda_local_index(gpu_ids: Sequence, visible: str | None) -> int:
    """The local CUDA index of the first of ``gpu_ids`` (``ray.get_gpu_ids()``, physical
    ids) when ``CUDA_VISIBLE_DEVICES`` is ``visible``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPUs, so its GPU is local index 0;
    with that variable unset (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) the
    physical id is the index."""
    if not gpu_ids:
        raise RuntimeError("this Ray worker was given no GPU (ask for num_gpus=1)")
    gid = str(gpu_ids[0])
    if visible is None or not visible.strip():
        return int(gid)
    ids = [v.strip() for v in visible.split(",")]
    if gid not in ids:
        raise RuntimeError(f"GPU {gid} given by Ray is not in CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(gid)


def worker_device(accelerator: str) -> torch.device:
    """The device of a Ray worker (one per device): the CPU, or the GPU Ray assigned to it,
    made this process's current CUDA device (NCCL and the caching allocator use it)."""
    if accelerator != "cuda":
        resolve(accelerator)  # a ConfigError for anything but cpu
        return torch.device("cpu")
    import ray

    index = cuda_local_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    resolve("cuda")  # a ConfigError when this process has no usable CUDA
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def to_device(obj, device: torch.device | str):
    """``obj`` with every tensor on ``device``: tensors, objects with a ``to(device)``
    (:class:`~fusedrl.rollout.RolloutBatch`), and dicts, lists and tuples of those.

    Ray objects cross between the controller (CPU) and the workers: a worker moves what
    it receives to its device, and its results to the CPU before returning them. Objects
    already on ``device`` are returned as they are (no copy on CPU)."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if hasattr(obj, "to") and not isinstance(obj, (str, bytes)):
        return obj.to(device)
    return obj


def to_host(obj):
    """``obj`` with every tensor on the CPU (a worker's results, before Ray pickles them)."""
    return to_device(obj, "cpu")


__all__ = ["auto_accelerator", "resolve", "device_of", "synchronize", "timer",
           "collective_backend", "backend_for", "cuda_local_index", "worker_device", "to_device",
           "to_host"]


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """verl's memory metrics of this process: ``perf/max_memory_allocated_gb`` (the CUDA
    caching allocator's peak) on a GPU, ``perf/cpu_memory_used_gb`` (peak resident set
    size of the process) always."""
    import resource

    out = {"perf/cpu_memory_used_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
           * 1024 / 1e9}  # Linux reports KiB
    if torch.device(device).type == "cuda":
        out["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out
