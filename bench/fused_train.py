"""Intra-stage fusion end to end (RLHFuse §5): wall time of the PPO training call with
actor and critic in one fused pipeline schedule vs the actor's 1F1B then the critic's,
on 2 workers with pp=2 for both models (critic stages reversed: its stage 0 on device 1),
measured as a ratio in one run (docs/design.md "Measuring").

    .venv/bin/python bench/fused_train.py [--reps 5] [--preset small] [--json OUT]

One trainer, one rollout: after a normal first iteration (generation, inference, and a
fused training call that profiles the stages and solves the schedule), the same
``train(batch, ...)`` call runs ``--reps`` times in each mode, alternated (fused,
sequential, fused, ...; one warm-up pair not counted), so that background load on a
shared machine hits both alike. The optimizer steps of every call change the weights
but not the shapes, so every call does the same work. Reported: the sum of the
measured times per mode, their ratio, the per-pair ratios, and the scheduler's
predicted ratio (sequential 1F1B makespan / fused makespan from the profiled times).
Each emulated device is one Ray worker with one torch thread.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).parent))
from common import emit, local_ray  # noqa: E402

import argparse
import os
import statistics
import sys
import time


def make_trainer(args):
    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer as make

    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.max_prompt_len=8",
        f"generation.max_new_tokens={args.new_tokens}", f"ppo.rollout_batch_size={args.batch}",
        f"ppo.mini_batch_size={args.batch}", f"ppo.micro_batch_size={args.micro}",
        "ppo.ppo_epochs=1", "cluster.devices=2", "placement.default=dp1tp1pp2@0-1",
        "placement.critic_train=dp1tp1pp2@1,0", "placement.critic_infer=dp1tp1pp2@1,0",
        "fusion.intrastage=true", "trainer.iterations=1"])
    return make(cfg)


def measure(args) -> dict:
    from fusedrl.runtime.stages import RayUpdate

    t = make_trainer(args)
    update = t.stages.update  # the fused one (fusion.intrastage=true)
    sequential = RayUpdate(t.stages.cluster, t.config, fused=False)
    captured = []
    train = update.train

    def capture(*a):
        captured.append(a)
        return train(*a)

    update.train = capture
    try:
        first = t.step()  # generation, inference, fused train (profile + solve)
        update.train = train
        times = {"fused": [], "sequential": []}
        for rep in range(args.reps + 1):
            for mode in ("fused", "sequential") if rep % 2 == 0 else ("sequential", "fused"):
                t0 = time.perf_counter()
                (update if mode == "fused" else sequential).train(*captured[0])
                dt = time.perf_counter() - t0
                if rep > 0:
                    times[mode].append(dt)
        fused = update.fused
        shape = next(iter(fused.results))
        res = fused.results[shape]
        predicted = res["baseline"]["sequential_1f1b"]["makespan"] / res["makespan"]
        out = {
            "microbatches_per_model": list(shape),
            "profile_ms": {k: [[1e3 * f, 1e3 * b] for f, b, _ in v]
                           for k, v in fused.profile.items()},
            "solve_seconds": fused.solve_seconds,
            "predicted_speedup": predicted,
            "lower_bound_ratio": res["makespan"] / res["lower_bound"],
            "first_iteration_train_s": first["timing_s/train"],
            "fused_s": times["fused"], "sequential_s": times["sequential"],
        }
    finally:
        t.close()
    out["ratio_fused_over_sequential"] = sum(times["fused"]) / sum(times["sequential"])
    out["pair_ratios"] = [f / s for f, s in zip(times["fused"], times["sequential"])]
    out["median_pair_ratio"] = statistics.median(out["pair_ratios"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default="")
    args = p.parse_args()
    t0 = time.time()
    with local_ray():
        res = measure(args)
    result = {"cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "preset": args.preset, "batch": args.batch, "micro_batch": args.micro,
              "new_tokens": args.new_tokens, **res, "wall_s": time.time() - t0}
    print(f"train call: fused {sum(res['fused_s']):.2f} s, sequential "
          f"{sum(res['sequential_s']):.2f} s over {args.reps} reps each; ratio fused/sequential "
          f"= {res['ratio_fused_over_sequential']:.3f} (median pair "
          f"{res['median_pair_ratio']:.3f}; scheduler predicts "
          f"{1 / res['predicted_speedup']:.3f})", file=sys.stderr)
    emit(result, args.json)


if __name__ == "__main__":
    main()
