"""Reallocation on local worker processes: one process per device, gloo, one thread each.

What ``fusedrl realloc``, the realloc benchmark and the executor tests run. The
parent spawns ``world_size`` processes (world rank == device id, docs/design.md), each
sets ``torch.set_num_threads(1)`` so that an emulated device is one core, and runs
a list of :class:`ReallocJob` in order (same list on every worker, so process
groups are created in the same order everywhere). A job builds weights, shards
them by the source placement, runs the :class:`~fusedrl.realloc.executor.ReallocExecutor`
``repeats`` times and reports the best time, the machine's large-copy bandwidth
measured in the same run, the per-device timing breakdown and, optionally, whether
every destination shard equals the shard of the full state dict.

Units: GB/s are 1e9 bytes per second, counting each payload byte once (a copy of
N bytes at ``memcpy_gbps`` takes N / memcpy_gbps / 1e9 seconds; a realloc moving
``bytes_moved`` cross-device bytes in ``seconds`` achieves ``gbps``).

Lifecycle::

    results = launch(run_jobs, world_size=4, args=([ReallocJob(...)],))
    summary = results[0][0]          # rank 0's result of the first job
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedrl.layout import Placement
from fusedrl.models.config import PRESETS, ModelConfig
from fusedrl.models.sharding import param_shapes, shard_state_dict
from fusedrl.realloc.executor import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_DIRECT_MIN_BYTES,
    DEFAULT_INFLIGHT,
    ReallocExecutor,
)
from fusedrl.realloc.plan import plan_realloc


# ------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=300))
        try:
            queue.put((rank, True, fn(rank, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report to the parent; it stops the other workers
        queue.put((rank, False, traceback.format_exc()))


def launch(fn: Callable, world_size: int, args: tuple = (), timeout: float = 600.0) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned gloo workers; their results by rank.

    Raises ``RuntimeError`` with the first worker's traceback if one fails, and
    ``TimeoutError`` after ``timeout`` seconds; either way the workers are stopped.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: os.environ.get(k) or v for k, v in env.items()})
    try:
        procs = [ctx.Process(target=_bootstrap, args=(r, world_size, port, fn, args, queue),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"realloc workers did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check for workers that died silently
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"worker exited with code {dead[0].exitcode}") from None
                continue
            if not ok:
                raise RuntimeError(f"worker {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[r] for r in range(world_size)]


# ------------------------------------------------------------------------ weights


def synthetic_shard(name: str, shape: tuple[int, ...], region, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic pseudo-random values of ``region`` of parameter ``name``.

    Element ``i`` (flat index in the full parameter) is a multiplicative hash of
    ``i`` and the name, in [-0.5, 0.5): any region is generated on its own, so large
    models need no full parameter anywhere, and a misplaced element is detected.
    """
    idx = torch.zeros((), dtype=torch.int64)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        a, b = region[d]
        ar = torch.arange(a, b, dtype=torch.int64) * stride
        idx = idx + ar.view((-1,) + (1,) * (len(shape) - 1 - d))
        stride *= shape[d]
    salt = (zlib.crc32(name.encode()) + 7919 * seed) & 0xFFFFFF
    v = (idx * 2654435761 + salt) & 0xFFFFFF
    return (v.to(torch.float32) / float(1 << 24) - 0.5).to(dtype)


def synthetic_shards(config: ModelConfig, placement: Placement, device: int, head: str = "lm",
                     seed: int = 0) -> dict[str, torch.Tensor] | None:
    from fusedrl.models.sharding import shard_regions

    rank = placement.rank_of(device)
    if rank is None:
        return None
    shapes = param_shapes(config, head)
    return {name: synthetic_shard(name, shapes[name], region, seed)
            for name, region in shard_regions(config, placement.layout, rank, head).items()}


def random_state_dict(config: ModelConfig, seed: int = 0,
                      head: str = "lm") -> dict[str, torch.Tensor]:
    """A full random state dict (same on every process for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g)
            for name, shape in param_shapes(config, head).items()}


# ------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class ReallocJob:
    """One reallocation to run on the local workers.

    ``model``: a preset name or a checkpoint path. ``weights``: ``"random"`` (a full
    random state dict on every worker, sharded with ``shard_state_dict``: small
    models), ``"synthetic"`` (:func:`synthetic_shard`, no full parameter) or
    ``"checkpoint"`` (``model`` is a path). ``memcpy_mb=0`` skips the copy benchmark.
    """

    model: str
    src: str
    dst: str
    weights: str = "random"
    verify: bool = True
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    inflight: int = DEFAULT_INFLIGHT
    direct_min_bytes: int = DEFAULT_DIRECT_MIN_BYTES
    transport: str = "collective"
    repeats: int = 1
    memcpy_mb: int = 0
    seed: int = 0


def resolve_model(model: str) -> ModelConfig:
    """A preset's config, or a checkpoint's (loaded from the path)."""
    if model in PRESETS:
        return PRESETS[model]
    from fusedrl.models.checkpoint import load_checkpoint

    return load_checkpoint(model)[0]


def memcpy_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """This process's large-copy bandwidth: best of ``repeats`` copies, GB/s (1e9 B/s)."""
    n = (megabytes << 20) // 4
    a = torch.ones(n)
    b = torch.empty(n)
    b.copy_(a)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return n * 4 / best / 1e9


def _inputs(job: ReallocJob, config: ModelConfig, src: Placement, dst: Placement, rank: int):
    """(source shards, expected destination shards) of this device."""
    if job.weights == "synthetic":
        return (synthetic_shards(config, src, rank, seed=job.seed),
                synthetic_shards(config, dst, rank, seed=job.seed))
    if job.weights == "random":
        full = random_state_dict(config, job.seed)
    elif job.weights == "checkpoint":
        from fusedrl.models.checkpoint import load_checkpoint

        full = load_checkpoint(job.model)[1]
    else:
        raise ValueError(f"weights must be random, synthetic or checkpoint, got {job.weights!r}")

    def cut(p: Placement):
        r = p.rank_of(rank)
        return None if r is None else shard_state_dict(full, config, p.layout, r)

    return cut(src), cut(dst)


def run_jobs(rank: int, jobs: list[ReallocJob]) -> list[dict[str, Any]]:
    """Worker body: run ``jobs`` in order; every worker returns its own result per job."""
    world = dist.get_world_size()
    out = []
    for job in jobs:
        config = resolve_model(job.model)
        src, dst = Placement.parse(job.src), Placement.parse(job.dst)
        plan = plan_realloc(config, src, dst, num_devices=world)
        ex = ReallocExecutor(plan, rank, bucket_bytes=job.bucket_bytes, inflight=job.inflight,
                             direct_min_bytes=job.direct_min_bytes, transport=job.transport)
        ex.build_groups()
        src_shards, expected = _inputs(job, config, src, dst, rank)
        dst_shards = ex.allocate_dst_shards()
        copy_gbps = 0.0
        dist.barrier()
        if job.memcpy_mb and rank == 0:  # the other workers wait idle in the barrier
            copy_gbps = memcpy_gbps(job.memcpy_mb)
        dist.barrier()
        best, best_stats = float("inf"), None
        for _ in range(job.repeats):
            if dst_shards is not None:
                for t in dst_shards.values():
                    t.fill_(float("nan"))  # a gap stays NaN and fails verification
            dist.barrier()
            stats = ex.run(src_shards, dst_shards) if rank in ex.devices else None
            elapsed = torch.tensor([stats.seconds if stats else 0.0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if elapsed.item() < best:
                best, best_stats = elapsed.item(), stats
        verified = None
        if job.verify:
            ok = all(torch.equal(dst_shards[k], expected[k]) for k in (expected or {}))
            flag = torch.tensor([1 if ok else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            verified = bool(flag.item())
        out.append({
            "job": asdict(job),
            "bytes_moved": plan.bytes_moved,
            "bytes_minimum": plan.bytes_minimum,
            "bytes_local": plan.bytes_local,
            "seconds": best,
            "gbps": plan.bytes_moved / best / 1e9 if best > 0 else 0.0,
            "memcpy_gbps": copy_gbps,
            "verified": verified,
            "messages": len(ex.schedule),
            "device_stats": best_stats.to_dict() if best_stats else None,
        })
    return out
