"""Reallocation bandwidth vs this machine's own copy bandwidth, and where the time goes.

    python bench/realloc_bench.py [--model base100m] [--bucket-mb 8 32] [--inflight 8]
                                  [--repeats 3] [--out bench/results/realloc_bench.json]

Four local gloo workers (rank == device id, one thread each) reshard a >=100M
parameter model (fp32, synthetic weights generated per shard) between

- ``tp2pp2 -> dp4``: ``dp1tp2pp2@0-3 -> dp4tp1pp1@0-3`` (every device ends with the
  whole model: each source shard is broadcast to the three other devices);
- ``dp2 -> tp2``: ``dp2tp1pp1@0-1 -> dp1tp2pp1@2-3`` (disjoint devices; on the same
  devices a dp2 -> tp2 reallocation moves nothing, every byte is already local).

Reported per case (docs/design.md "Measuring": ratios taken in the same run):
``fraction = gbps / memcpy_gbps`` where ``gbps`` = cross-device bytes (each
receiver counted) / seconds of the slowest worker, best of ``--repeats``, and
``memcpy_gbps`` is one worker's best copy of a 256 MiB buffer while the others
idle; both in 1e9 bytes/s counting each payload byte once. Also the transport's own
ceiling (a 256 MiB gloo send between two workers, alone and as two concurrent
pairs), and each worker's time split into pack / unpack (staging copies), local
copies, issue and wait (blocked on communication). Two transports side by side:
``collective`` (gloo broadcast / isend-irecv over TCP loopback, the path NCCL takes
on GPUs) and ``shm`` (shared-memory staging slots, :mod:`fusedrl.realloc.shm`).
The machine has fewer cores than workers when ``os.cpu_count() < 4``: the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fusedrl.models.config import PRESETS
from fusedrl.realloc.local import ReallocJob, launch, memcpy_gbps, run_jobs

PAIRS = {
    "tp2pp2->dp4": ("dp1tp2pp2@0-3", "dp4tp1pp1@0-3"),
    "dp2->tp2": ("dp2tp1pp1@0-1", "dp1tp2pp1@2-3"),
}


def _p2p_ceiling(rank: int, megabytes: int, repeats: int) -> dict:
    """gloo send bandwidth: pair 0->1 alone, then pairs 0->1 and 2->3 at once."""
    n = (megabytes << 20) // 4
    buf = torch.ones(n)
    out = {}
    for name, senders in (("one_pair", (0,)), ("two_pairs", (0, 2))):
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            if rank in senders:
                dist.send(buf, rank + 1)
            elif rank - 1 in senders:
                dist.recv(buf, rank - 1)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            best = min(best, elapsed.item())
        out[name] = len(senders) * n * 4 / best / 1e9
    return out


def _worker(rank: int, jobs: list[ReallocJob], ceiling_mb: int, repeats: int) -> dict:
    copy = memcpy_gbps(256) if rank == 0 else 0.0
    dist.barrier()
    return {"ceiling": _p2p_ceiling(rank, ceiling_mb, repeats), "memcpy_gbps": copy,
            "jobs": run_jobs(rank, jobs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base100m", choices=sorted(PRESETS))
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[8, 32])
    ap.add_argument("--inflight", type=int, default=8)
    ap.add_argument("--transport", nargs="+", default=["collective", "shm"],
                    choices=["collective", "shm"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/realloc_bench.json"))
    args = ap.parse_args()

    config = PRESETS[args.model]
    grid = [(name, tr, mb) for name in PAIRS for tr in args.transport for mb in args.bucket_mb]
    jobs = [ReallocJob(args.model, *PAIRS[name], weights="synthetic", verify=True,
                       bucket_bytes=int(mb * (1 << 20)), inflight=args.inflight,
                       transport=tr, repeats=args.repeats, memcpy_mb=256)
            for name, tr, mb in grid]
    t0 = time.perf_counter()
    per_rank = launch(_worker, 4, (jobs, 256, args.repeats), timeout=1800)
    wall = time.perf_counter() - t0

    cores = os.cpu_count()
    print(f"model {args.model}: {config.num_params() / 1e6:.0f}M params (fp32); 4 gloo workers, "
          f"1 thread each, on {cores} cores{' (oversubscribed)' if cores < 4 else ''}")
    ceiling = per_rank[0]["ceiling"]
    base_copy = per_rank[0]["memcpy_gbps"]
    print(f"memcpy {base_copy:.2f} GB/s; gloo send ceiling: one pair "
          f"{ceiling['one_pair']:.2f} GB/s ({ceiling['one_pair'] / base_copy:.2f} of memcpy), "
          f"two concurrent pairs {ceiling['two_pairs']:.2f} GB/s "
          f"({ceiling['two_pairs'] / base_copy:.2f})")
    best_copy = max([base_copy] + [per_rank[0]["jobs"][i]["memcpy_gbps"]
                                    for i in range(len(jobs))])
    header = (f"{'case':<13}{'transport':>11}{'bucket':>8}{'moved MB':>10}{'s':>8}{'GB/s':>7}"
              f"{'memcpy':>8}{'frac*':>6}"
              f"{'frac':>6}  {'pack':>6}{'unpack':>7}{'local':>7}{'issue':>7}{'wait':>7}  ok")
    print(header)
    rows = []
    for i, ((name, _, _), job) in enumerate(zip(grid, jobs)):
        results = [per_rank[r]["jobs"][i] for r in range(4)]
        r0 = results[0]
        stats = [r["device_stats"] for r in results if r["device_stats"]]
        split = {k: max(s[k] for s in stats) for k in
                 ("seconds", "pack_s", "unpack_s", "local_s", "issue_s", "wait_s")}
        frac = r0["gbps"] / r0["memcpy_gbps"]
        rows.append({"case": name, "transport": job.transport, "src": job.src, "dst": job.dst,
                     "bucket_mb": job.bucket_bytes / (1 << 20), "inflight": job.inflight,
                     "bytes_moved": r0["bytes_moved"], "bytes_minimum": r0["bytes_minimum"],
                     "seconds": r0["seconds"], "gbps": r0["gbps"],
                     "memcpy_gbps": r0["memcpy_gbps"], "fraction": frac,
                     "fraction_of_best_memcpy": r0["gbps"] / best_copy,
                     "verified": r0["verified"], "max_per_device_s": split,
                     "device_stats": [r["device_stats"] for r in results]})
        print(f"{name:<13}{job.transport:>11}{job.bucket_bytes / (1 << 20):>7.0f}M"
              f"{r0['bytes_moved'] / 1e6:>10.0f}"
              f"{r0['seconds']:>8.3f}{r0['gbps']:>7.2f}{r0['memcpy_gbps']:>8.2f}"
              f"{r0['gbps'] / best_copy:>6.2f}{frac:>6.2f}  "
              f"{split['pack_s']:>6.3f}{split['unpack_s']:>7.3f}{split['local_s']:>7.3f}"
              f"{split['issue_s']:>7.3f}{split['wait_s']:>7.3f}  {r0['verified']}")
    print("(frac: of the memcpy measured just before the case; frac*: of the best memcpy of "
          f"the whole run, {best_copy:.2f} GB/s, conservative when the machine is loaded.\n"
          " pack/unpack/local/issue/wait: seconds, the maximum over workers, of the best run)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "params": config.num_params(),
                                    "cores": cores, "workers": 4, "memcpy_gbps": base_copy,
                                    "best_memcpy_gbps": best_copy,
                                    "load_average": os.getloadavg(),
                                    "gloo_ceiling_gbps": ceiling, "rows": rows,
                                    "wall_s": wall}, indent=1))
    print(f"wrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
