"""Data-parallel scaling of the training call on this machine: tokens/s of PPO actor +
critic training at dp1 vs dp2, measured side by side in one run (DESIGN.md "Measuring":
a ratio, not an absolute time). Each emulated device is one Ray worker with one torch
thread; run it on a machine with at least 2 free cores.

    .venv/bin/python bench/scaling.py [--iterations 3] [--preset small] [--json OUT]

Both layouts run the same config through the Ray runtime (2 workers; at dp1 the second
stays idle), the first iteration is a warm-up, and the training tokens/s is
``ppo_epochs * tokens of the rollout batch / timing_s/train`` summed over the measured
iterations. Generation and inference are not part of the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings


def measure(placement: str, args) -> dict:
    from fusedrl.config import load_config
    from fusedrl.runtime.controller import DistributedPPOTrainer

    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.max_prompt_len=8",
        f"generation.max_new_tokens={args.new_tokens}", f"ppo.rollout_batch_size={args.batch}",
        f"ppo.mini_batch_size={args.batch // 2}", f"ppo.micro_batch_size={args.micro}",
        "ppo.ppo_epochs=1", "cluster.devices=2", f"placement.default={placement}",
        f"trainer.iterations={args.iterations + 1}"])
    trainer = DistributedPPOTrainer(cfg)
    try:
        trainer.step()  # warm-up
        tokens = seconds = 0.0
        for _ in range(args.iterations):
            m = trainer.step()
            tokens += m["perf/total_num_tokens"] * cfg.ppo.ppo_epochs
            seconds += m["timing_s/train"]
    finally:
        trainer.close()
    return {"placement": placement, "train_tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", default="")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    warnings.filterwarnings("ignore")
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-"),
             log_to_driver=False)
    t0 = time.time()
    try:
        dp1 = measure("dp1tp1pp1@0", args)
        dp2 = measure("dp2tp1pp1@0-1", args)
    finally:
        ray.shutdown()
    result = {"cores": os.cpu_count(), "preset": args.preset, "batch": args.batch,
              "micro_batch": args.micro, "dp1": dp1, "dp2": dp2,
              "speedup_dp2_over_dp1": dp2["tokens_per_s"] / dp1["tokens_per_s"],
              "wall_s": time.time() - t0}
    print(f"train tokens/s: dp1 {dp1['tokens_per_s']:.0f}, dp2 {dp2['tokens_per_s']:.0f}, "
          f"ratio dp2/dp1 = {result['speedup_dp2_over_dp1']:.2f}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
