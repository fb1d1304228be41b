"""Quality of the fused actor/critic schedules on RLHFuse §5's published problem family.

Instances come from ``fusedrl.scheduler.pipeline_families.family_instances``: 8 or 16
nodes; the actor's pipeline over all nodes and either one critic pipeline over all
nodes in reverse order or two critic pipelines of half as many stages, each reversed
over its half (K1·N1 = K2·N2 = N), each critic training its share of the
micro-batches; 4 to 64 micro-batches; integer forward times with backward = 2 x
forward; a different activation memory per pipeline.

Every instance is searched as ``fusedrl schedule P.json --time-limit T`` does (the
default lexicographic objective: makespan first, then peak memory at that makespan;
two search processes on a 2-core machine). The table reports the makespan against the
lower bound (and, where the bound is above RLHFuse's plain bound, why: the result's
``bound_gap_reason``), the peak memory against the memory lower bound at that makespan
and against the pipelines' 1F1B schedules side by side, and both against sequential
1F1B (actor's 1F1B, then the critics'). Each instance is then searched again, with the
same time limit and processes, by our reimplementation of RLHFuse §5's published search
(``fusedrl.scheduler.pipeline_rlhfuse``: the paper's greedy start, adjacent-swap
annealing on the makespan, then annealing on memory that keeps the makespan), and the
table says whether ours is at or below it in both makespan and peak memory. The
paper's own per-instance results are not available here; this is a reimplementation
from its description. All figures are the scheduler's *predicted* (simulated) times in
the problem's units.

    python bench/schedule_quality.py [--time-limit 20] [--count 24] [--seed 0]
                                     [--only 8x2x16,...] [--memory-cap 1f1b] [--no-reference]

``--only NxKxM``: the generated instances with N nodes, K critics and M micro-batches
(the uniform instance, unit times and memory, where none was generated). Writes
``bench/results/schedule.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from fusedrl.scheduler.pipeline_families import FamilyInstance, family_instances
from fusedrl.scheduler.pipeline_problem import FusedProblem
from fusedrl.scheduler.pipeline_rlhfuse import reference_search
from fusedrl.scheduler.pipeline_schedule import solve

RESULTS = Path(__file__).parent / "results" / "schedule.json"


def run_instance(inst: FamilyInstance, time_limit: float, seed: int, memory_cap, reference: bool) -> dict:
    problem = FusedProblem.from_dict(inst.problem())
    t0 = time.perf_counter()
    res = solve(problem, time_limit=time_limit, seed=seed, memory_cap=memory_cap)
    seconds = time.perf_counter() - t0
    out = res.to_dict()
    seq = res.sequential_1f1b
    lb = res.lower_bound
    ref = reference_search(problem, time_limit=time_limit, seed=seed) if reference else None
    eps = 1e-9 * max(1.0, res.makespan)
    return {
        "instance": inst.name, **inst.to_dict(), "tasks": res.table.num_tasks,
        "predicted_makespan": res.makespan,
        "lower_bound": lb.value,
        "rlhfuse_lower_bound": lb.plain,
        "bound_gap": res.makespan / lb.value - 1.0,
        "bound_gap_reason": out["bound_gap_reason"],
        "peak_memory": res.peak_memory,
        "memory_lower_bound": out["memory_lower_bound"],
        "side_by_side_1f1b_peak": res.side_by_side_peak,
        "sequential_1f1b_predicted_makespan": seq.makespan,
        "sequential_1f1b_peak": seq.peak_memory,
        "greedy_predicted_makespan": res.greedy.makespan,
        "greedy_peak": res.greedy.peak_memory,
        "predicted_speedup_vs_sequential_1f1b": seq.makespan / res.makespan,
        "bubble_ratio": res.bubble_ratio,
        "seconds": seconds,
        "reference_predicted_makespan": ref.makespan if ref else None,
        "reference_peak_memory": ref.peak_memory if ref else None,
        "reference_start_predicted_makespan": ref.start_makespan if ref else None,
        "reference_start_peak_memory": ref.start_peak_memory if ref else None,
        "reference_moves": [ref.makespan_moves, ref.memory_moves] if ref else None,
        "at_or_below_reference": (res.makespan <= ref.makespan + eps and res.peak_memory <= ref.peak_memory + eps)
        if ref else None,
    }


def select(args) -> list[FamilyInstance]:
    insts = family_instances(args.count, seed=args.seed)
    if not args.only:
        return insts
    out = []
    for spec in args.only.split(","):
        try:
            n, k, m = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--only: expected NODESxCRITICSxMICROBATCHES, got {spec!r}") from None
        match = [i for i in insts if (i.nodes, i.critics, i.microbatches) == (n, k, m)]
        out += match or [FamilyInstance(n, k, m, 1, 1, 1, 1)]
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=20.0, help="search seconds per problem")
    ap.add_argument("--count", type=int, default=24, help="instances of the family")
    ap.add_argument("--seed", type=int, default=0, help="generator and search seed")
    ap.add_argument("--only", default="", help="comma-separated NODESxCRITICSxMICROBATCHES, e.g. 16x2x64")
    ap.add_argument("--memory-cap", default=None, help="a number or 1f1b (default: none, lexicographic)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the reimplemented RLHFuse search")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cap = args.memory_cap
    if cap is not None and cap.lower() != "1f1b":
        cap = float(cap)
    rows = []
    head = (f"{'instance':<24} {'tasks':>5} {'makespan':>8} {'LB':>6} {'gap':>6} {'peak':>5} {'memLB':>5} "
            f"{'1F1Bx2':>6} {'seq1F1B':>7} {'seqpk':>5} {'speedup':>7} {'sec':>5} "
            f"{'refmk':>6} {'refpk':>5} {'<=ref':>5}  bound_gap_reason")
    print(f"time limit {args.time_limit:g} s per instance, load average {os.getloadavg()[0]:.1f} "
          f"(all figures predicted by the scheduler)")
    print(head)
    for inst in select(args):
        r = run_instance(inst, args.time_limit, args.seed, cap, args.reference)
        rows.append(r)
        print(f"{inst.name:<24} {r['tasks']:>5} {r['predicted_makespan']:>8g} {r['lower_bound']:>6g} "
              f"{100 * r['bound_gap']:>5.1f}% {r['peak_memory']:>5g} {r['memory_lower_bound']:>5.1f} "
              f"{r['side_by_side_1f1b_peak']:>6g} {r['sequential_1f1b_predicted_makespan']:>7g} "
              f"{r['sequential_1f1b_peak']:>5g} {r['predicted_speedup_vs_sequential_1f1b']:>6.3f}x "
              f"{r['seconds']:>5.1f} {_fmt(r['reference_predicted_makespan']):>6} "
              f"{_fmt(r['reference_peak_memory']):>5} {_fmt(r['at_or_below_reference']):>5}  "
              f"{r['bound_gap_reason'] or ''}", flush=True)
    eps = 1e-9
    summary = {
        "problems": len(rows),
        "at_lower_bound": sum(r["bound_gap"] <= eps for r in rows),
        "within_1pct_of_lower_bound": sum(r["bound_gap"] <= 0.01 + eps for r in rows),
        "max_bound_gap": max((r["bound_gap"] for r in rows), default=0.0),
        "peak_at_memory_lower_bound": sum(r["peak_memory"] <= r["memory_lower_bound"] + 1 - eps
                                          for r in rows),
        "peak_within_side_by_side_1f1b": sum(r["peak_memory"] <= r["side_by_side_1f1b_peak"] + eps for r in rows),
        "shorter_than_sequential_1f1b": sum(r["predicted_makespan"] < r["sequential_1f1b_predicted_makespan"]
                                            for r in rows),
        "max_seconds": max((r["seconds"] for r in rows), default=0.0),
    }
    if args.reference:
        summary["at_or_below_reference_in_both"] = sum(bool(r["at_or_below_reference"]) for r in rows)
        summary["reference_at_lower_bound"] = sum(
            r["reference_predicted_makespan"] <= r["lower_bound"] * (1 + eps) for r in rows)
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "schedule_quality", "time_limit": args.time_limit, "seed": args.seed,
        "memory_cap": args.memory_cap,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
