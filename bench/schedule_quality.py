"""Quality of the fused actor/critic schedules on RLHFuse §5's problem families.

Families (``fusedrl.scheduler.pipeline_families``): 8 and 16 stages; actor:critic
stage ratio 1:1 (one reversed critic) and 2:1 (two reversed critic replicas, each
spanning half the nodes and training half the micro-batches); 8, 16, 32 and 64
micro-batches; backward = 2 x forward; one unit of memory per outstanding
micro-batch and stage.

For every instance the search runs with the default memory cap (the peak of the
pipelines' 1F1B schedules side by side, so fusion never costs memory) and the
table reports the makespan against the plain lower bound and against the bound
under that memory cap (which is higher where the cap provably costs time), the
peak memory against the side-by-side 1F1B peak, sequential 1F1B (actor then
critic) and the search's wall time. ``--uncapped`` adds a run with no memory cap
(RLHFuse's objective: makespan first).

    python bench/schedule_quality.py [--time-limit 20] [--only 16x2x64] [--uncapped]

Writes ``bench/results/schedule.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

from fusedrl.scheduler.pipeline_bounds import lower_bound
from fusedrl.scheduler.pipeline_families import actor_critic_problem
from fusedrl.scheduler.pipeline_problem import FusedProblem
from fusedrl.scheduler.pipeline_schedule import solve

FAMILIES = [(stages, ratio, mb) for stages in (8, 16) for ratio in (1, 2) for mb in (8, 16, 32, 64)]
RESULTS = Path(__file__).parent / "results" / "schedule.json"


def run_instance(stages: int, ratio: int, microbatches: int, time_limit: float, seed: int,
                 uncapped: bool) -> dict:
    problem = FusedProblem.from_dict(actor_critic_problem(stages, ratio, microbatches))
    t0 = time.perf_counter()
    res = solve(problem, time_limit=time_limit, seed=seed)
    seconds = time.perf_counter() - t0
    plain = lower_bound(problem).value
    seq = res.sequential_1f1b
    row = {
        "stages": stages, "ratio": f"{ratio}:1", "microbatches": microbatches,
        "tasks": res.table.num_tasks,
        "makespan": res.makespan,
        "lower_bound": plain,
        "lower_bound_at_cap": res.lower_bound.value,
        "gap": res.makespan / plain - 1.0,
        "gap_at_cap": res.makespan / res.lower_bound.value - 1.0,
        "peak_memory": res.peak_memory,
        "side_by_side_1f1b_peak": res.side_by_side_peak,
        "bubble_ratio": res.bubble_ratio,
        "sequential_1f1b_makespan": seq.makespan,
        "sequential_1f1b_peak": seq.peak_memory,
        "greedy_makespan": res.greedy.makespan,
        "speedup_vs_1f1b": seq.makespan / res.makespan,
        "seconds": seconds,
    }
    if uncapped:
        t0 = time.perf_counter()
        free = solve(problem, time_limit=time_limit, seed=seed, memory_cap=math.inf)
        row.update(uncapped_makespan=free.makespan, uncapped_peak=free.peak_memory,
                   uncapped_seconds=time.perf_counter() - t0)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=20.0, help="search seconds per problem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated STAGESxRATIOxMICROBATCHES, e.g. 16x2x64")
    ap.add_argument("--uncapped", action="store_true", help="also search without a memory cap")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    wanted = {tuple(int(x) for x in s.split("x")) for s in args.only.split(",") if s}
    rows = []
    head = (f"{'stages':>6} {'ratio':>5} {'mb':>3} {'makespan':>8} {'LB':>6} {'gap':>6} {'LB@cap':>7} "
            f"{'gap@cap':>7} {'peak':>5} {'1F1Bx2':>6} {'seq1F1B':>7} {'speedup':>7} {'sec':>5}")
    print(head + ("  uncapped(makespan/peak)" if args.uncapped else ""))
    for stages, ratio, mb in FAMILIES:
        if wanted and (stages, ratio, mb) not in wanted:
            continue
        r = run_instance(stages, ratio, mb, args.time_limit, args.seed, args.uncapped)
        rows.append(r)
        line = (f"{stages:>6} {r['ratio']:>5} {mb:>3} {r['makespan']:>8g} {r['lower_bound']:>6g} "
                f"{100 * r['gap']:>5.1f}% {r['lower_bound_at_cap']:>7g} {100 * r['gap_at_cap']:>6.1f}% "
                f"{r['peak_memory']:>5g} {r['side_by_side_1f1b_peak']:>6g} "
                f"{r['sequential_1f1b_makespan']:>7g} {r['speedup_vs_1f1b']:>6.2f}x {r['seconds']:>5.1f}")
        if args.uncapped:
            line += f"  {r['uncapped_makespan']:g}/{r['uncapped_peak']:g}"
        print(line, flush=True)
    within = sum(r["gap"] <= 0.01 + 1e-12 for r in rows)
    within_cap = sum(r["gap_at_cap"] <= 0.01 + 1e-12 for r in rows)
    mem_ok = sum(r["peak_memory"] <= r["side_by_side_1f1b_peak"] for r in rows)
    summary = {"problems": len(rows), "within_1pct_of_lower_bound": within,
               "within_1pct_of_bound_at_memory_cap": within_cap,
               "peak_memory_within_side_by_side_1f1b": mem_ok,
               "max_seconds": max((r["seconds"] for r in rows), default=0.0)}
    print(json.dumps(summary))
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "schedule_quality", "time_limit": args.time_limit, "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_end": load},
        "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
