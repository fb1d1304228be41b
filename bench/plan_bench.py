"""Execution-plan search at cluster scale (simulated): searched plan vs Xiao et al.'s
three placement strategies vs a Megatron-style heuristic (issue 9).

Settings: RLHFuse's (arXiv 2409.13221 §7: LLaMA 13B/33B/65B actor = critic, batch
512, mini-batch 64, 256 prompt + up to 1024 generated tokens) and ReaLHF-like
(arXiv 2406.14088 §6: LLaMA 7B-70B, batch 512, mini-batch 64, 128 prompt + up to
256 generated tokens), 16-256 simulated H100s. Every plan is priced by the same
cost (:class:`fusedrl.sim.plan_eval.PlanEvaluator`); the strategies are tuned on
it (layouts, micro-batches, fusion), the heuristic is not.

    python bench/plan_bench.py [--time-limit 15] [--cases realhf-7b-16,...]

Writes ``bench/results/plan.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from fusedrl.models.config import PRESETS
from fusedrl.scheduler.plan_search import search
from fusedrl.sim.iteration import Workload
from fusedrl.sim.plan_eval import PlanEvaluator

CASES = {
    # name: (setting, model preset, gpus, prompt, max_new_tokens)
    "realhf-7b-16": ("ReaLHF", "llama-7b", 16, 128, 256),
    "realhf-13b-32": ("ReaLHF", "llama-13b", 32, 128, 256),
    "realhf-33b-64": ("ReaLHF", "llama-33b", 64, 128, 256),
    "realhf-70b-128": ("ReaLHF", "llama2-70b", 128, 128, 256),
    "rlhfuse-13b-64": ("RLHFuse", "llama-13b", 64, 256, 1024),
    "rlhfuse-33b-128": ("RLHFuse", "llama-33b", 128, 256, 1024),
    "rlhfuse-65b-256": ("RLHFuse", "llama-65b", 256, 256, 1024),
}


def run_case(name: str, time_limit: float, seed: int) -> dict:
    setting, preset, gpus, prompt, gen = CASES[name]
    model = PRESETS[preset]
    w = Workload.build(batch_size=512, prompt_len=prompt, max_new_tokens=gen,
                       mini_batch_size=64, micro_batch_size=1, max_gen_batch=256, seed=seed)
    ev = PlanEvaluator(model, model, w, gpus, seed=seed)
    res = search(ev.space(), ev.score, time_limit=time_limit, seed=seed, workers=2,
                 explain=lambda p: ev.evaluate(p, timeline=False).memory_error)
    best = ev.evaluate(res.best, timeline=False)
    out = {"case": name, "setting": setting, "model": preset, "gpus": gpus,
           "searched": {"iteration_s": best.iteration_s, "peak_gb": best.peak_memory_bytes / 1e9,
                        "plan": res.best.to_dict()},
           "search_s": res.seconds, "strategies_s": res.baseline_seconds,
           "annealing_steps": sum(c.steps for c in res.chains),
           "plans_evaluated": sum(c.evaluations for c in res.chains)}
    for b, (p, s) in res.baselines.items():
        out[b] = {"iteration_s": s.time_s, "fits": s.fits, "plan": p.to_dict()}
    strat = [out[s]["iteration_s"] for s in ("flattening", "interleaving", "separation")
             if s in out and out[s]["fits"]]
    out["best_strategy_s"] = min(strat) if strat else None
    out["speedup_vs_best_strategy"] = (min(strat) / best.iteration_s) if strat else None
    if "heuristic" in out and out["heuristic"]["fits"]:
        out["speedup_vs_heuristic"] = out["heuristic"]["iteration_s"] / best.iteration_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=15.0, help="seconds per annealing chain")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan.json"))
    args = ap.parse_args()
    rows = []
    for name in args.cases.split(","):
        t0 = time.time()
        row = run_case(name, args.time_limit, args.seed)
        row["wall_s"] = time.time() - t0
        rows.append(row)
        f = lambda k: f"{row[k]['iteration_s']:.2f}" if k in row else "-"  # noqa: E731
        print(f"{name:18s} searched {row['searched']['iteration_s']:.2f}s | flattening {f('flattening')} "
              f"interleaving {f('interleaving')} separation {f('separation')} heuristic "
              f"{f('heuristic')} | vs best strategy x{row['speedup_vs_best_strategy'] or 0:.3f} "
              f"| search {row['search_s']:.0f}s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "time_limit_s": args.time_limit, "seed": args.seed, "host": platform.node(),
        "load_average": os.getloadavg(), "cases": rows}, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
