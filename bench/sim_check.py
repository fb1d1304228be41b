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

Then the runtime's own overheads (Ray dispatch per call, per-micro-batch work, gloo
all-reduce + optimizer step, per engine step) are measured by a separate small
profile of the real runtime on fixed synthetic shapes
(:func:`fusedrl.sim.overheads.profile_runtime`, not the e2e runs) and the
comparison is repeated with them (``overheads``); each row reports both
(``before``: kernels only, ``after``: kernels + runtime overheads).
``inference_padding`` is a diagnostic, not used by the prediction: padded tokens
over real tokens of the runtime's inference micro-batches (each padded to its
longest sample; the simulator prices the mean length).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

# e2e variant -> simulator variant
VARIANT_NAMES = {"baseline": "baseline", "realloc": "realloc", "intrastage": "intra-stage",
                 "interstage": "inter-stage", "all": "all"}
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
    from fusedrl.sim.overheads import RuntimeOverheads, profile_runtime

    torch.set_num_threads(1)
    e2e = json.loads(args.e2e.read_text())
    w = e2e["workload"]
    model = PRESETS[_setting(w, "model.preset")]
    batch = int(_setting(w, "ppo.rollout_batch_size"))
    max_new = int(_setting(w, "generation.max_new_tokens"))
    spec = _setting(w, "generation.forced_lengths")
    report = calibrate_on_cpu(model)
    micro = int(_setting(w, "ppo.micro_batch_size"))
    try:
        overheads, overhead_raw = profile_runtime(_setting(w, "model.preset"),
                                                  micro_batch_size=micro,
                                                  prompt_len=args.prompt_len)
    except Exception as e:  # the runtime's API moved: compare the kernels alone
        overheads, overhead_raw = RuntimeOverheads(), {"error": f"{type(e).__name__}: {e}"}
        print(f"warning: runtime overhead profile failed ({overhead_raw['error']}); "
              f"'after' equals 'before'")
    print("runtime overheads:", json.dumps(overheads.to_dict()))
    terms = {"before": RuntimeOverheads(), "after": overheads}
    padding = []
    # The trainer draws iteration i's lengths with seed (trainer.seed * 1_000_003 + i);
    # e2e measures ``iterations`` iterations after one warm-up (seed 0, i >= 1).
    iters = range(1, 1 + int(e2e["iterations"]))
    by_variant = {r["variant"]: r for r in e2e["rows"] if "error" not in r}
    rows = []
    for name, sim_name in VARIANT_NAMES.items():
        if name not in by_variant:
            continue
        measured = by_variant[name]
        preds = {(t, s): [] for t in terms for s in STAGES}
        for i in iters:
            out = np.array(forced_lengths(spec, batch, seed=i, max_len=max_new))
            prev = np.array(forced_lengths(spec, batch, seed=i - 1, max_len=max_new))
            work = Workload(np.full(batch, args.prompt_len), out, prev, max_new,
                            int(_setting(w, "ppo.mini_batch_size")),
                            int(_setting(w, "ppo.micro_batch_size")),
                            ppo_epochs=int(_setting(w, "ppo.ppo_epochs")),
                            max_gen_batch=int(_setting(w, "generation.max_batch_size")))
            v = {"baseline": Variant("baseline", False, False, False),
                 "realloc": Variant("realloc", True, False, False),
                 "intra-stage": Variant("intra-stage", True, False, True),
                 "inter-stage": Variant("inter-stage", False, True, False),
                 "all": Variant("all", True, True, True)}[sim_name]
            if name == "baseline":
                lens = args.prompt_len + out
                padding.append(sum(len(c) * c.max() for c in np.split(lens, batch // micro))
                               / lens.sum())
            for t, ov in terms.items():
                sim = IterationSimulator(model, model, work, 2, report.hardware, report.after,
                                         dtype_bytes=4, schedule_time_s=1.0, overheads=ov)
                res = sim.run([v]).by_name(sim_name)
                for s in STAGES:
                    preds[(t, s)].append(res.timing_s[s])
        row = {"variant": name}
        stages = STAGES if sim_name not in ("inter-stage", "all") else ("gen", "train")
        for s in stages:
            row[f"{s}/measured_s"] = measured[f"timing_s/{s}"]
            for t in terms:
                pred = float(np.median(preds[(t, s)]))
                row[f"{s}/{t}/predicted_s"] = pred
                row[f"{s}/{t}/ratio_predicted_over_measured"] = pred / measured[f"timing_s/{s}"]
        rows.append(row)
        print(json.dumps(row))
    errors = {t: [abs(v - 1) for r in rows for k, v in r.items()
                  if k.endswith(f"/{t}/ratio_predicted_over_measured")] for t in terms}
    result = {"benchmark": "sim_check", "cores": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "e2e": str(args.e2e),
              "calibration": report.to_dict(), "runtime_overheads": overheads.to_dict(),
              "runtime_profile": overhead_raw,
              "inference_padding": float(np.median(padding)) if padding else None,
              "rows": rows,
              "max_stage_error_before": max(errors["before"]) if errors["before"] else None,
              "max_stage_error": max(errors["after"]) if errors["after"] else None}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'variant':>11} {'stage':>9} {'measured':>9} {'pred/meas before':>16} "
          f"{'pred/meas after':>15}")
    for r in rows:
        for s in STAGES:
            if f"{s}/measured_s" in r:
                print(f"{r['variant']:>11} {s:>9} {r[f'{s}/measured_s']:9.3f} "
                      f"{r[f'{s}/before/ratio_predicted_over_measured']:16.2f} "
                      f"{r[f'{s}/after/ratio_predicted_over_measured']:15.2f}")
    print(f"inference micro-batch padding (padded/real tokens): {result['inference_padding']}")
    print(f"max per-stage |predicted/measured - 1|: before {result['max_stage_error_before']}, "
          f"after {result['max_stage_error']}")


if __name__ == "__main__":
    main()
