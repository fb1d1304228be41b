"""Execution-plan search on this machine (issue 9): the REAL iteration time of the
searched plan against Xiao et al.'s three placement strategies, as ``fusedrl train``
runs them, with the predicted times beside them.

One run: the search of ``fusedrl train --plan auto`` (roofline calibrated on this
CPU, restricted to plans the runtime executes, :mod:`fusedrl.cli.plan`) gives the
searched plan and the tuned strategies (flattening, interleaving, separation); each
is written to a plan file and trained with ``fusedrl train --plan FILE`` for
``--iterations`` iterations in a subprocess (its own local Ray instance); the real
time is the median ``timing_s/step`` after the first iteration.

    python bench/plan_real.py [--devices 2] [--iterations 6] [--time-limit 10]
        [--set generation.max_new_tokens=48 ...]

Writes ``bench/results/plan_real.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SET = ("generation.max_new_tokens=48", "generation.forced_lengths=lognormal:6,48",
               "generation.max_batch_size=64", "trainer.save_every=0")
"""The default task with a long tail of forced output lengths (median 6, p99 48
tokens): the case inter-stage fusion and separate placements are about."""


def run_plan(plan_file: Path, overrides: list[str], iterations: int, out: Path) -> dict:
    """``fusedrl train --plan plan_file``; median step seconds after the first."""
    cmd = [sys.executable, "-m", "fusedrl", "train", "--plan", str(plan_file), "--out", str(out),
           "--threads", "1", *[a for o in overrides for a in ("--set", o)],
           "--set", f"trainer.iterations={iterations}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["timing_s/step"] for r in rows]
    keys = ("gen", "inference", "train", "realloc", "rollout")
    later = rows[1:] or rows
    return {"step_s": statistics.median(steps[1:] or steps), "steps_s": steps,
            "stage_s": {k: statistics.median(r.get(f"timing_s/{k}", 0.0) for r in later)
                        for k in keys},
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=None,
                    help=f"config override (default: {' '.join(DEFAULT_SET)})")
    ap.add_argument("--out", default=str(ROOT / "bench/results/plan_real.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from fusedrl.cli.common import DEFAULT_CONFIG
    from fusedrl.cli.plan import RUNTIME_RESTRICTIONS, auto_plan
    from fusedrl.config import load_config
    from fusedrl.scheduler.plan_search import STRATEGIES

    overrides = list(args.set if args.set is not None else DEFAULT_SET)
    overrides.append(f"cluster.devices={args.devices}")
    cfg = load_config(DEFAULT_CONFIG, overrides)
    found = auto_plan(cfg, time_limit=args.time_limit, seed=args.seed)
    plans = {"searched": (found.plan, found.predicted_s)}
    for name in STRATEGIES:
        if name in found.strategies:
            plans[name] = (found.strategies[name], found.strategies_s[name])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="plan_real-") as tmp:
        for name, (plan, predicted) in plans.items():
            f = Path(tmp) / f"{name}.yaml"
            plan.save(f)
            got = run_plan(f, overrides, args.iterations, Path(tmp) / name)
            results[name] = {"predicted_s": predicted, **got, "plan": plan.to_dict()}
            print(f"{name:<13} predicted {predicted:.3f} s  real "
                  + (f"{got['step_s']:.3f} s" if "step_s" in got else f"failed: {got['error']}"),
                  flush=True)
    missing = [s for s in STRATEGIES if s not in plans]
    out = {"bench": "plan_real", "host": platform.node(), "cpus": os.cpu_count(),
           "devices": args.devices, "iterations": args.iterations, "overrides": overrides,
           "search_s": found.search_s, "restrictions": list(RUNTIME_RESTRICTIONS),
           "strategies_not_runnable": missing, "calibration": found.calibration,
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    print(f"\n{'plan':<13} {'predicted s':>12} {'real s':>8} {'real/searched':>14}  "
          "gen / train placement, fusion")
    base = results["searched"].get("step_s")
    for name, r in results.items():
        p = r["plan"]
        real = r.get("step_s")
        print(f"{name:<13} {r['predicted_s']:>12.3f} "
              f"{(f'{real:.3f}' if real is not None else 'failed'):>8} "
              f"{(f'{real / base:.2f}' if real is not None and base else '-'):>14}  "
              f"{p['calls']['actor_gen']['placement']} / {p['calls']['actor_train']['placement']},"
              f" {p['calls']['critic_train']['placement']}; inter={p['fusion']['inter_stage']} "
              f"intra={p['fusion']['intra_stage']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
