"""Whole PPO iterations: the flattening baseline against fusedrl with each
optimisation switched on in turn, on a long-tailed workload, in one run.

    python bench/e2e.py [--iterations 5] [--preset small] [--lengths lognormal:16,160]
                        [--out bench/results/e2e.json]

Variants on 2 devices (one core each), same model, prompts, seed and forced output
lengths (benchmark mode: ``generation.forced_lengths``):

- ``baseline``: DeepSpeed-Chat's "flattening" — every model on both devices with one
  layout (dp2), stages one after another;
- ``realloc``: each call on its own layout (ReaLHF): generation dp2, training pp2,
  weights resharded every iteration by the reallocation engine;
- ``interstage``: baseline + sample-level generation with long-tail migration and
  streamed inference (RLHFuse §4);
- ``intrastage``: realloc + the fused actor/critic pipeline schedule (critic stages
  reversed, RLHFuse §5);

An ``all`` variant (realloc + inter-stage + intra-stage) is not run yet: the runtime's
sample-level rollout computes old log-probs per device and needs ``actor_train`` at
tp=pp=1, while the fused schedule needs pp >= 2 for training.

Reported per variant: samples/s and tokens/s over the iterations after the first
(warm-up), the per-stage medians, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

COMMON = ["cluster.devices=2", "trainer.save_every=1000"]
DP2 = ["placement.default=dp2tp1pp1@0-1"]
PP2 = ["placement.default=dp2tp1pp1@0-1", "placement.actor_gen=dp2tp1pp1@0-1",
       "placement.actor_train=dp1tp1pp2@0-1", "placement.critic_train=dp1tp1pp2@1,0",
       "placement.critic_infer=dp2tp1pp1@0-1", "placement.ref=dp2tp1pp1@0-1"]
VARIANTS = {
    "baseline": DP2 + ["fusion.interstage=false"],
    "realloc": PP2 + ["fusion.interstage=false"],
    "interstage": DP2 + ["fusion.interstage=true"],
    "intrastage": PP2 + ["fusion.interstage=false", "fusion.intrastage=true"],
}


def run_variant(name: str, overrides: list[str], iterations: int, workdir: Path) -> dict:
    from fusedrl.config import load_config
    from fusedrl.run import train

    cfg = load_config(None, overrides + [f"trainer.iterations={iterations}"])
    t0 = time.perf_counter()
    hist = train(cfg, workdir / name, show_progress=False)
    wall = time.perf_counter() - t0
    measured = hist[1:] if len(hist) > 1 else hist
    step = sum(m["timing_s/step"] for m in measured)
    samples = cfg.ppo.rollout_batch_size * len(measured)
    tokens = sum(m["perf/total_num_tokens"] for m in measured)
    stages = {k: statistics.median(m[k] for m in measured)
              for k in measured[0] if k.startswith("timing_s/")}
    return {"variant": name, "samples_per_s": samples / step, "tokens_per_s": tokens / step,
            "iterations_measured": len(measured), "wall_s": wall,
            "score_last": hist[-1]["critic/score/mean"], **stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--lengths", default="lognormal:16,160")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e2e.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workload = [f"model.preset={args.preset}", f"ppo.rollout_batch_size={args.batch}",
                "ppo.mini_batch_size=32", "ppo.micro_batch_size=8",
                f"generation.max_new_tokens={args.max_new_tokens}",
                "data.max_prompt_len=8", f"generation.forced_lengths={args.lengths}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"error: unknown variant {name!r}; known: {list(VARIANTS)}")
            row = run_variant(name, COMMON + workload + VARIANTS[name], args.iterations,
                              Path(tmp))
            rows.append(row)
            print(json.dumps(row))
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    if base is not None:
        for r in rows:
            r["speedup_vs_baseline"] = r["samples_per_s"] / base["samples_per_s"]
    result = {"benchmark": "e2e", "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "workload": workload, "iterations": args.iterations, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['variant']:>11}: {r['samples_per_s']:.2f} samples/s, "
              f"{r['tokens_per_s']:.0f} tok/s, x{r.get('speedup_vs_baseline', float('nan')):.2f}")


if __name__ == "__main__":
    main()
