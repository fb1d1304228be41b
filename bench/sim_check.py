"""Calibration check: the simulator's per-stage prediction of the CPU runs of
``bench/e2e.py`` against their measured times (predicted / measured per stage).

    python bench/sim_check.py [--e2e bench/results/e2e.json] [--out bench/results/sim_check.json]

Steps, in one run: measure this CPU (matmul FLOP/s, copy bandwidth), profile the native
engine on the e2e model and fit the roofline's efficiency factors
(:func:`fusedrl.sim.calibration.calibrate_on_cpu`); rebuild the e2e workload with the
same forced output lengths (same spec and seeds as ``generation.forced_lengths``);
simulate it on 2 devices in float32 with the calibrated cost model; compare each
stage the two share. Inference is compared for the variants where it runs after
generation (no inter-stage overlap).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

# e2e variant -> simulator variant
VARIANT_NAMES = {"baseline": "baseline", "realloc": "realloc", "intrastage": "intra-stage",
                 "interstage": "inter-stage"}
STAGES = ("gen", "inference", "train")


def _setting(workload: list[str], key: str) -> str:
    return next(w.split("=", 1)[1] for w in workload if w.startswith(key + "="))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    results = Path(__file__).parent / "results"
    ap.add_argument("--e2e", type=Path, default=results / "e2e.json")
    ap.add_argument("--prompt-len", type=int, default=6,
                    help="prompt tokens of the built-in repeat task (<bos> + 5 characters)")
    ap.add_argument("--out", type=Path, default=results / "sim_check.json")
    args = ap.parse_args()
    if not args.e2e.exists():
        raise SystemExit(f"error: {args.e2e} does not exist: run bench/e2e.py first")
    import torch

    from fusedrl.generation.lengths import forced_lengths
    from fusedrl.models.config import PRESETS
    from fusedrl.sim.calibration import calibrate_on_cpu
    from fusedrl.sim.iteration import IterationSimulator, Variant, Workload

    torch.set_num_threads(1)
    e2e = json.loads(args.e2e.read_text())
    w = e2e["workload"]
    model = PRESETS[_setting(w, "model.preset")]
    batch = int(_setting(w, "ppo.rollout_batch_size"))
    max_new = int(_setting(w, "generation.max_new_tokens"))
    spec = _setting(w, "generation.forced_lengths")
    report = calibrate_on_cpu(model)
    # The trainer draws iteration i's lengths with seed (trainer.seed * 1_000_003 + i);
    # e2e measures the iterations after the first (seed 0, i >= 1).
    iters = range(1, int(e2e["iterations"]))
    by_variant = {r["variant"]: r for r in e2e["rows"]}
    rows = []
    for name, sim_name in VARIANT_NAMES.items():
        if name not in by_variant:
            continue
        measured = by_variant[name]
        preds = {s: [] for s in STAGES}
        for i in iters:
            out = np.array(forced_lengths(spec, batch, seed=i, max_len=max_new))
            prev = np.array(forced_lengths(spec, batch, seed=i - 1, max_len=max_new))
            work = Workload(np.full(batch, args.prompt_len), out, prev, max_new,
                            int(_setting(w, "ppo.mini_batch_size")),
                            int(_setting(w, "ppo.micro_batch_size")), max_gen_batch=64)
            v = {"baseline": Variant("baseline", False, False, False),
                 "realloc": Variant("realloc", True, False, False),
                 "intra-stage": Variant("intra-stage", True, False, True),
                 "inter-stage": Variant("inter-stage", False, True, False)}[sim_name]
            sim = IterationSimulator(model, model, work, 2, report.hardware, report.after,
                                     dtype_bytes=4, schedule_time_s=1.0)
            res = sim.run([v]).by_name(sim_name)
            for s in STAGES:
                preds[s].append(res.timing_s[s])
        row = {"variant": name}
        stages = STAGES if sim_name != "inter-stage" else ("gen", "train")
        for s in stages:
            pred = float(np.median(preds[s]))
            row[f"{s}/predicted_s"] = pred
            row[f"{s}/measured_s"] = measured[f"timing_s/{s}"]
            row[f"{s}/ratio_predicted_over_measured"] = pred / measured[f"timing_s/{s}"]
        rows.append(row)
        print(json.dumps(row))
    errors = [abs(v - 1) for r in rows for k, v in r.items() if k.endswith("measured")
              and k.startswith(STAGES) and "ratio" in k]
    result = {"benchmark": "sim_check", "cores": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "e2e": str(args.e2e),
              "calibration": report.to_dict(), "rows": rows,
              "max_stage_error": max(errors) if errors else None}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"max per-stage |predicted/measured - 1| = {result['max_stage_error']}")


if __name__ == "__main__":
    main()
