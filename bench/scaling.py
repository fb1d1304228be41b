"""Data-parallel scaling of the training call on this machine: tokens/s of PPO actor +
critic training at dp1 vs dp2, measured side by side in one run (docs/design.md "Measuring":
a ratio, not an absolute time). Each emulated device is one Ray worker with one torch
thread; run it on a machine with at least 2 free cores.

    .venv/bin/python bench/scaling.py [--iterations 3] [--preset small] [--json OUT]

Both layouts run the same config through the Ray runtime (2 workers each; at dp1 the
second stays idle), both trainers alive at once with their iterations alternated, the
first iteration a warm-up; the training tokens/s is
``ppo_epochs * tokens of the rollout batch / timing_s/train`` summed over the measured
iterations. Generation and inference are not part of the figure.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).parent))
from common import emit, local_ray  # noqa: E402

import argparse
import os
import sys
import time


def make_trainer(placement: str, args):
    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer as make

    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.max_prompt_len=8",
        f"generation.max_new_tokens={args.new_tokens}", f"ppo.rollout_batch_size={args.batch}",
        f"ppo.mini_batch_size={args.batch // 2}", f"ppo.micro_batch_size={args.micro}",
        "ppo.ppo_epochs=1", "cluster.devices=2", f"placement.default={placement}",
        f"trainer.iterations={args.iterations + 1}"])
    return make(cfg)


def measure(args) -> dict:
    """Both layouts alive at once (4 workers, 2 busy at a time), iterations alternated
    so that background load on a shared machine hits both alike."""
    layouts = {"dp1": "dp1tp1pp1@0", "dp2": "dp2tp1pp1@0-1"}
    trainers = {k: make_trainer(p, args) for k, p in layouts.items()}
    out = {k: {"placement": p, "train_tokens": 0.0, "train_seconds": 0.0, "per_iteration": []}
           for k, p in layouts.items()}
    try:
        for t in trainers.values():
            t.step()  # warm-up
        for _ in range(args.iterations):
            for k, t in trainers.items():
                m = t.step()
                tokens = m["perf/total_num_tokens"] * t.config.ppo.ppo_epochs
                out[k]["train_tokens"] += tokens
                out[k]["train_seconds"] += m["timing_s/train"]
                out[k]["per_iteration"].append(tokens / m["timing_s/train"])
    finally:
        for t in trainers.values():
            t.close()
    for v in out.values():
        v["tokens_per_s"] = v["train_tokens"] / v["train_seconds"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", default="")
    args = p.parse_args()
    t0 = time.time()
    with local_ray():
        res = measure(args)
        dp1, dp2 = res["dp1"], res["dp2"]
    result = {"cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "preset": args.preset, "batch": args.batch,
              "micro_batch": args.micro, "dp1": dp1, "dp2": dp2,
              "speedup_dp2_over_dp1": dp2["tokens_per_s"] / dp1["tokens_per_s"],
              "wall_s": time.time() - t0}
    print(f"train tokens/s: dp1 {dp1['tokens_per_s']:.0f}, dp2 {dp2['tokens_per_s']:.0f}, "
          f"ratio dp2/dp1 = {result['speedup_dp2_over_dp1']:.2f}", file=sys.stderr)
    emit(result, args.json)


if __name__ == "__main__":
    main()
