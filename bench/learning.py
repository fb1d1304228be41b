"""Learning curves: train each config for a wall-clock budget and record the validation
score (``val/score/mean`` on held-out prompts) against training time and iterations.

    python bench/learning.py --config configs/smollm2-arith.yaml \
        --config configs/smollm2-arith-grpo.yaml --minutes 30 --val-every 5 \
        [--set KEY=VALUE ...] [--out bench/results/learning]

    # a variant: the same config with and without a switch, side by side
    python bench/learning.py --config configs/smollm2-arith-grpo.yaml \
        --config configs/smollm2-arith-grpo.yaml --with fusion.interstage_policy=partial \
        --minutes 30 --threads 1 --parallel

Writes ``OUT.json`` (one curve per config: iteration, training seconds, val score,
train score) and ``OUT.png`` (validation score against wall time and against
iterations, one line per algorithm). Training time excludes validation. The configs
run one after the other (a learning curve is not a speed ratio: each run has the
machine alone); the load average at the start and end of each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from queue import Empty
from pathlib import Path


def curve(config_path: str, overrides: list[str], minutes: float, val_every: int,
          variant: list[str] | None = None) -> dict:
    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer

    variant = variant or []
    overrides = overrides + variant
    cfg = load_config(config_path, overrides + ["trainer.iterations=100000",
                                                f"trainer.val_every={val_every}"])
    label = f"{cfg.algorithm.adv_estimator} ({Path(config_path).stem})"
    if variant:
        label += " " + " ".join(variant)
    load = [os.getloadavg()[0]]
    t = make_trainer(cfg)
    points = []
    try:
        v = t.validate()
        points.append({"iteration": 0, "train_s": 0.0, **v})
        print(f"{label}: iteration 0 val {v['val/score/mean']:.3f}", flush=True)
        spent, budget = 0.0, minutes * 60
        while spent < budget:
            t0 = time.perf_counter()
            m = t.step()
            spent += time.perf_counter() - t0
            if t.iteration % val_every == 0 or spent >= budget:
                v = t.validate()
                points.append({"iteration": t.iteration, "train_s": spent,
                               "train_score": m["critic/score/mean"], **v})
                print(f"{label}: iteration {t.iteration} ({spent / 60:.1f} min) val "
                      f"{v['val/score/mean']:.3f} train {m['critic/score/mean']:.3f}",
                      flush=True)
    finally:
        t.close()
    load.append(os.getloadavg()[0])
    # ru_maxrss is in KiB on Linux: the peak of this process (one run) only.
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"label": label, "config": config_path, "overrides": overrides, "points": points,
            "load_avg_start_end": load, "peak_rss_gb": peak_rss_gb}


def _curve_in_child(queue, threads: int, *args) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    queue.put(curve(*args))


def curve_in_process(threads: int, *args) -> dict:
    """:func:`curve` in a fresh (spawned) process: its peak memory is the run's alone."""
    return wait_for(start_curve(threads, *args), args[0])


def start_curve(threads: int, *args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_curve_in_child, args=(queue, threads, *args))
    proc.start()
    return proc, queue


def wait_for(started, config_path: str) -> dict:
    proc, queue = started
    args = (config_path,)
    while True:  # read before join: a large result would block the child's exit
        try:
            result = queue.get(timeout=10)
            break
        except Empty:
            if not proc.is_alive():
                raise SystemExit(f"learning run {args[0]} failed "
                                 f"(exit code {proc.exitcode})") from None
    proc.join()
    return result


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for c in curves:
        xs = [p["train_s"] / 60 for p in c["points"]]
        its = [p["iteration"] for p in c["points"]]
        ys = [p["val/score/mean"] for p in c["points"]]
        a.plot(xs, ys, marker="o", label=c["label"])
        b.plot(its, ys, marker="o", label=c["label"])
    a.set_xlabel("training time (minutes, measured)")
    b.set_xlabel("iteration")
    a.set_ylabel("val/score/mean (held-out prompts)")
    a.legend()
    fig.suptitle("validation score (measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _WithLast(argparse.Action):
    """``--with KEY=VALUE``: (index of the last ``--config`` so far, [overrides])."""

    def __call__(self, parser, namespace, value, option_string=None):
        configs = getattr(namespace, "config", None) or []
        if not configs:
            parser.error(f"--with {value}: give it after the --config it modifies")
        found = dict(getattr(namespace, self.dest) or [])
        found.setdefault(len(configs) - 1, []).append(value)
        setattr(namespace, self.dest, sorted(found.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--with", action=_WithLast, default=[], dest="variants",
                    metavar="KEY=VALUE",
                    help="an override for the --config before it only (a variant: the same "
                         "config twice, with and without a switch)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--parallel", action="store_true",
                    help="run the configs at the same time (use --threads 1 on 2 cores)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "learning")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    variants = dict(args.variants)
    if args.parallel:  # all at once, each with --threads: the same load for every run
        started = [start_curve(args.threads, c, args.overrides, args.minutes, args.val_every,
                               variants.get(k, []))
                   for k, c in enumerate(args.config)]
        curves = [wait_for(p, c) for p, c in zip(started, args.config)]
    else:
        curves = [curve_in_process(args.threads, c, args.overrides, args.minutes,
                                   args.val_every, variants.get(k, []))
                  for k, c in enumerate(args.config)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"curves": curves}, indent=1))
    plot(curves, args.out.with_suffix(".png"))
    for c in curves:
        p = c["points"]
        print(f"{c['label']}: val {p[0]['val/score/mean']:.3f} -> {p[-1]['val/score/mean']:.3f}"
              f" in {p[-1]['train_s'] / 60:.1f} min ({p[-1]['iteration']} iterations),"
              f" peak RSS {c['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
