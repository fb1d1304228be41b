"""Whole PPO iterations: the flattening baseline against fusedrl with each idea switched
on alone and all together, on a long-tailed workload, variants alternated in one run.

    python bench/e2e.py [--variants baseline,realloc,interstage,intrastage,all]
                        [--packed on|off|both]
                        [--iterations 5] [--json] [--preset small] [--batch 32]
                        [--micro-batch 2] [--max-new-tokens 512] [--lengths lognormal:8,256]
                        [--no-predict] [--overheads profile|none] [--out bench/results/e2e.json]

Variants on 2 devices (one core each), same model, prompts, seed and forced output
lengths (benchmark mode: ``generation.forced_lengths``):

- ``baseline``: DeepSpeed-Chat's "flattening": every model on both devices with one
  layout (dp2), stages one after another (``fusion.interstage=false``);
- ``realloc``: each call on its own layout (ReaLHF, arXiv 2406.14088): generation and
  inference dp2, actor training pp2 on devices 0,1, critic training pp2 reversed (1,0),
  weights resharded every iteration by the reallocation engine;
- ``interstage``: baseline + sample-level generation with long-tail migration and
  inference streamed onto the freed device (RLHFuse §4, ``fusion.interstage=true``);
- ``intrastage``: realloc + the fused actor/critic pipeline schedule (critic stages
  reversed, RLHFuse §5, ``fusion.intrastage=true``);
- ``all``: realloc's placements + both fusions.

``--packed`` (issue 19): ``on`` runs each variant with packed sequences under the
default token budgets (``ppo.packed``, ``ppo.micro_batch_tokens``: the samples of a
micro-batch laid into rows by first-fit decreasing), ``off`` with right-padded
micro-batches of ``--micro-batch`` samples (no budgets), ``both`` each variant both ways
(rows ``VARIANT/packed`` and ``VARIANT/padded``, alternated in the same rounds); then
each variant's row reports ``packed_vs_padded``: the padded over the packed
inference + training seconds per round (median of the paired rounds) and the pad ratios
(``perf/pad_ratio/{inference,train}``, computed over real tokens) of both.

Method: every variant's trainer is built once, each with its own two Ray workers, in one
Ray instance with a logical CPU per worker. Then ``trainer.step()`` runs round-robin
(A B C D E, A B C D E, ...): one warm-up round, then ``--iterations`` measured rounds, so
slow drifts of the shared machine's load hit every variant alike. Round ``i`` of every
variant is PPO iteration ``i``: the same prompts and forced lengths.

Workload (RLHFuse §2, §7): long-tailed output lengths, lognormal with p99 >= 8x the
median (the realised median and p99 of the measured iterations' lengths are reported),
so that generation -- whose tail decodes at a batch of a few samples -- weighs in the
baseline's iteration, which is where the fusions pay (the measured share is reported as
``baseline_gen_share_of_step``). Why the defaults: on one core per device a decode step
of the ``small`` model costs about what training costs per 1-3 tokens, so generation's
share grows with the longest sample over the tokens per device: few samples per device
(32 in all), a heavy tail (median 8, p99 256), one PPO epoch in one mini-batch, and
micro-batches of 2 (each is padded to its longest sample: small ones waste the least on
the tail).

Reported per variant (``rows``), all *measured* unless the key says otherwise:
``samples_per_s`` (samples over the summed step times of the measured rounds), the
median stage times ``timing_s/{gen,inference,train,realloc,step}``,
``device_utilization`` (median of the runtime's ``perf/device_utilization``: device-
seconds inside model calls over device-seconds of the iteration, from per-device event
timestamps; null when the runtime does not report it), ``speedup_vs_baseline``
(samples/s over the baseline's) and ``speedup_vs_baseline_paired_median`` (median over
rounds of the baseline's step time over the variant's in the same round); and the
simulator's *prediction* for the variant on the same workload (:mod:`fusedrl.sim`,
calibrated on this CPU, with the runtime overheads of :func:`~fusedrl.sim.overheads.
profile_runtime`, on the variant's own layouts): ``predicted_step_s``,
``predicted_timing_s/*``, ``predicted_samples_per_s``, ``predicted_vs_measured``
(predicted over measured median step time). With ``--json`` the last stdout line is the
whole result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import local_ray  # noqa: E402

COMMON = ["cluster.devices=2", "trainer.save_every=1000000"]
DP2 = ["placement.default=dp2tp1pp1@0-1"]
# Per-call layouts (ReaLHF): generation and inference on dp2, training on pp2 with the
# critic's stages reversed (RLHFuse §5 places them so that the fused schedule can
# interleave the two pipelines' stages on each device).
PP2 = ["placement.default=dp2tp1pp1@0-1", "placement.actor_gen=dp2tp1pp1@0-1",
       "placement.actor_train=dp1tp1pp2@0-1", "placement.critic_train=dp1tp1pp2@1,0",
       "placement.critic_infer=dp2tp1pp1@0-1", "placement.ref=dp2tp1pp1@0-1"]
OFF = ["fusion.interstage=false", "fusion.intrastage=false"]
VARIANTS = {
    "baseline": DP2 + OFF,
    "realloc": PP2 + OFF,
    "interstage": DP2 + ["fusion.interstage=true", "fusion.intrastage=false"],
    "intrastage": PP2 + ["fusion.interstage=false", "fusion.intrastage=true"],
    "all": PP2 + ["fusion.interstage=true", "fusion.intrastage=true"],
}
# e2e variant -> the simulator's (fusedrl.sim.iteration.Variant) switches:
# (per-call layouts, inter-stage, intra-stage)
SIM_SWITCHES = {"baseline": (False, False, False), "realloc": (True, False, False),
                "interstage": (False, True, False), "intrastage": (True, False, True),
                "all": (True, True, True)}
PACKING = {"packed": ["ppo.packed=true"],
           "padded": ["ppo.packed=false", "ppo.micro_batch_tokens=0",
                      "ppo.infer_micro_batch_tokens=0"]}
"""``--packed`` on / off: packed rows under the default token budgets, or right-padded
micro-batches of ``--micro-batch`` samples."""
STAGES = ("gen", "inference", "train", "realloc", "step")
PAD_KEYS = ("perf/pad_ratio/inference", "perf/pad_ratio/train")
UTIL_KEY = "perf/device_utilization"


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an error (Ray's terminal colours removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def length_seed(config, iteration: int) -> int:
    """The seed of iteration ``iteration``'s forced lengths (``PPOTrainer.requests``)."""
    return config.trainer.seed * 1_000_003 + iteration


def realised_lengths(config, iterations: range) -> np.ndarray:
    """The forced output lengths of ``iterations``, drawn as the trainer draws them."""
    from fusedrl.generation.lengths import forced_lengths

    g, b = config.generation, config.ppo.rollout_batch_size
    return np.concatenate([forced_lengths(g.forced_lengths, b, seed=length_seed(config, i),
                                          max_len=g.max_new_tokens) for i in iterations])


# ----------------------------------------------------------------------- prediction


def predict(configs: dict, prompt_len: int, iterations: range, args) -> tuple[dict, dict]:
    """The simulator's step time per variant: median over ``iterations`` of the
    simulated iteration on that iteration's forced lengths, each variant on the layouts
    of its own config. Returns ``(per-variant predictions, calibration info)``."""
    import torch

    from fusedrl.generation.lengths import forced_lengths
    from fusedrl.sim.calibration import calibrate_on_cpu
    from fusedrl.sim.iteration import IterationSimulator, Variant, Workload
    from fusedrl.sim.overheads import RuntimeOverheads, profile_runtime
    from fusedrl.trainer import build_setup

    torch.set_num_threads(1)
    any_cfg = next(iter(configs.values()))
    model = build_setup(any_cfg).model_config
    t0 = time.perf_counter()
    report = calibrate_on_cpu(model)
    info: dict = {"calibration": report.to_dict(), "calibration_s": time.perf_counter() - t0}
    overheads = RuntimeOverheads()
    if args.overheads == "profile":
        t0 = time.perf_counter()
        try:
            overheads, raw = profile_runtime(
                any_cfg.model.preset, micro_batch_size=any_cfg.ppo.micro_batch_size,
                prompt_len=prompt_len)
            info["runtime_profile"] = raw
        except Exception as e:  # the runtime's API moved: predict from the kernels alone
            info["runtime_overheads_error"] = one_line(e)
            print(f"warning: runtime overhead profile failed ({one_line(e)}); "
                  f"predicting from the calibrated kernels alone", file=sys.stderr)
        info["runtime_profile_s"] = time.perf_counter() - t0
    info["runtime_overheads"] = overheads.to_dict()

    class FixedLayouts(IterationSimulator):
        """The simulator on the variant's own layouts instead of its own search."""

        gen_layout_, train_layout_ = None, None

        def flatten_layout(self):
            return self.train_layout_

        def train_layout(self):
            return self.train_layout_

        def gen_layout(self, lt):
            plan = self.gen_plan(self.gen_layout_, lt, flatten=False)
            if plan is None:
                raise ValueError(f"simulator: generation layout {self.gen_layout_} does not "
                                 f"fit beside training {lt}")
            return plan

    out = {}
    for name, cfg in configs.items():
        g, p = cfg.generation, cfg.ppo
        per_call, inter, intra = SIM_SWITCHES[name.split("/")[0]]
        variant = Variant(name, per_call, inter, intra)
        # packed rows compute (almost) no padding: the simulator's "none"
        padding = "none" if p.packed else "micro_batch"
        times: dict[str, list[float]] = {s: [] for s in STAGES}
        for i in iterations:
            lens = lambda k: np.array(forced_lengths(  # noqa: E731
                g.forced_lengths, p.rollout_batch_size, seed=length_seed(cfg, k),
                max_len=g.max_new_tokens))
            work = Workload(np.full(p.rollout_batch_size, prompt_len), lens(i), lens(i - 1),
                            g.max_new_tokens, p.mini_batch_size, p.micro_batch_size,
                            ppo_epochs=p.ppo_epochs, max_gen_batch=g.max_batch_size,
                            padding=padding)
            sim = FixedLayouts(model, model, work, cfg.cluster.devices, report.hardware,
                               report.after, dtype_bytes=4,
                               schedule_time_s=args.schedule_time, overheads=overheads)
            sim.gen_layout_ = cfg.placement.of("actor_gen").layout
            sim.train_layout_ = cfg.placement.of("actor_train").layout
            res = sim.run([variant]).by_name(name)
            for s in STAGES:
                times[s].append(res.timing_s[s])
        out[name] = {f"predicted_timing_s/{s}": float(np.median(v)) for s, v in times.items()}
        out[name]["predicted_step_s"] = out[name]["predicted_timing_s/step"]
        out[name]["predicted_samples_per_s"] = (p.rollout_batch_size
                                                / out[name]["predicted_step_s"])
    return out, info


# ------------------------------------------------------------------------ measuring


def summarize(name: str, config, metrics: list[dict]) -> dict:
    """A variant's row from the metrics of its measured iterations."""
    steps = [m["timing_s/step"] for m in metrics]
    b = config.ppo.rollout_batch_size
    row = {"variant": name, "iterations_measured": len(metrics),
           "samples_per_s": b * len(metrics) / sum(steps),
           "tokens_per_s": sum(m["perf/total_num_tokens"] for m in metrics) / sum(steps),
           "step_s": steps}
    for s in STAGES:
        vals = [m[f"timing_s/{s}"] for m in metrics if f"timing_s/{s}" in m]
        row[f"timing_s/{s}"] = statistics.median(vals) if vals else None
    util = [m[UTIL_KEY] for m in metrics if m.get(UTIL_KEY) is not None]
    row["device_utilization"] = statistics.median(util) if len(util) == len(metrics) else None
    if row["device_utilization"] is None:
        row["device_utilization_note"] = (f"the runtime reports no {UTIL_KEY} for this "
                                          f"variant; nothing is estimated in its place")
    if "response_length/mean" in metrics[0]:
        row["response_length_mean"] = statistics.mean(m["response_length/mean"]
                                                      for m in metrics)
    row["score_last"] = metrics[-1].get("critic/score/mean")
    row["packed"] = config.ppo.packed
    for key in PAD_KEYS:
        row[key] = statistics.median(m[key] for m in metrics)
    row["infer_train_s"] = [m.get("timing_s/inference", 0.0) + m["timing_s/train"]
                            for m in metrics]
    return row


def packed_vs_padded(rows: dict, variant: str) -> dict | None:
    """The packed run of ``variant`` against its padded one (both measured in the same
    rounds): padded over packed inference + training seconds, per round and the
    median, and both runs' pad ratios."""
    a, b = rows.get(f"{variant}/padded"), rows.get(f"{variant}/packed")
    if not a or not b or "error" in a or "error" in b:
        return None
    pairs = [x / y for x, y in zip(a["infer_train_s"], b["infer_train_s"])]
    return {"infer_train_speedup_per_round": pairs,
            "infer_train_speedup_paired_median": statistics.median(pairs),
            "step_speedup_paired_median": statistics.median(
                x / y for x, y in zip(a["step_s"], b["step_s"])),
            **{f"padded/{k}": a[k] for k in PAD_KEYS},
            **{f"packed/{k}": b[k] for k in PAD_KEYS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--packed", choices=("on", "off", "both"), default="on",
                    help="packed sequences under token budgets (on), right-padded "
                         "micro-batches (off), or each variant both ways (both)")
    ap.add_argument("--iterations", type=int, default=5, help="measured rounds, after one "
                    "warm-up round")
    ap.add_argument("--json", action="store_true", help="last stdout line: the result as "
                    "one JSON object")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32, help="ppo.rollout_batch_size")
    ap.add_argument("--mini-batch", type=int, default=32, help="ppo.mini_batch_size")
    ap.add_argument("--micro-batch", type=int, default=2, help="ppo.micro_batch_size")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--lengths", default="lognormal:8,256",
                    help="generation.forced_lengths (lognormal:MEDIAN,P99)")
    ap.add_argument("--no-predict", action="store_true", help="skip the simulator")
    ap.add_argument("--overheads", choices=("profile", "none"), default="profile",
                    help="runtime overheads of the prediction: profiled on the runtime, or "
                         "none (calibrated kernels alone)")
    ap.add_argument("--schedule-time", type=float, default=1.0,
                    help="simulator: search budget (s) of each fused pipeline schedule")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e2e.json")
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    for n in names:
        if n not in VARIANTS:
            ap.error(f"--variants: unknown variant {n!r}; known: {','.join(VARIANTS)}")
    if args.iterations < 1:
        ap.error(f"--iterations must be >= 1, got {args.iterations}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.trainer import build_setup

    workload = [f"model.preset={args.preset}", f"ppo.rollout_batch_size={args.batch}",
                f"ppo.mini_batch_size={args.mini_batch}",
                f"ppo.micro_batch_size={args.micro_batch}", f"ppo.ppo_epochs={args.ppo_epochs}",
                f"generation.max_new_tokens={args.max_new_tokens}",
                f"generation.max_batch_size={args.batch}", "data.max_prompt_len=8",
                f"generation.forced_lengths={args.lengths}"]
    modes = {"on": ["packed"], "off": ["padded"], "both": ["packed", "padded"]}[args.packed]
    variants = names
    # one run per (variant, packing), alternated in the same rounds
    names = [n if len(modes) == 1 else f"{n}/{mode}" for n in variants for mode in modes]
    configs = {n: load_config(None, COMMON + workload + VARIANTS[n.split("/")[0]]
                              + PACKING[mode])
               for n, mode in zip(names, [m for _ in variants for m in modes])}
    measured_its = range(1, 1 + args.iterations)
    lens = realised_lengths(next(iter(configs.values())), measured_its)
    median, p99 = float(np.median(lens)), float(np.percentile(lens, 99))
    lengths = {"spec": args.lengths, "count": int(lens.size), "median": median, "p99": p99,
               "max": int(lens.max()), "p99_over_median": p99 / median}
    log = lambda *a: print(*a, file=sys.stderr if args.json else sys.stdout,  # noqa: E731
                           flush=True)
    log(f"forced output lengths of the measured iterations: median {median:g}, p99 {p99:g} "
        f"(p99/median {p99 / median:.1f}), max {lengths['max']}")

    rows: dict[str, dict] = {n: {"variant": n} for n in names}
    trainers: dict = {}
    metrics: dict[str, list[dict]] = {n: [] for n in names}
    prompt_len = None
    phases: dict[str, float] = {}
    # One logical CPU per worker of every variant, plus two for the overhead profile.
    with local_ray(num_cpus=2 * len(names) + 2):
        try:
            t0 = time.perf_counter()
            for n in names:
                try:
                    setup = build_setup(configs[n])
                    if prompt_len is None:
                        prompt_len = int(round(statistics.mean(map(len, setup.prompt_ids))))
                    trainers[n] = make_trainer(configs[n], setup)
                    log(f"built {n}")
                except Exception as e:
                    rows[n]["error"] = f"build: {one_line(e)}"
                    log(f"{n}: {rows[n]['error']}")
            phases["build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for r in range(1 + args.iterations):
                for n in [n for n in names if n in trainers]:
                    try:
                        m = trainers[n].step()
                    except Exception as e:
                        rows[n]["error"] = f"iteration {r}: {one_line(e)}"
                        log(f"{n}: {rows[n]['error']}")
                        traceback.print_exc(file=sys.stderr)
                        trainers.pop(n).close()
                        continue
                    log(f"round {r}{' (warm-up)' if r == 0 else ''} {n}: step "
                        f"{m['timing_s/step']:.2f}s gen {m.get('timing_s/gen', 0):.2f}s "
                        f"inference {m.get('timing_s/inference', 0):.2f}s train "
                        f"{m.get('timing_s/train', 0):.2f}s")
                    if r > 0:
                        metrics[n].append(m)
        finally:
            phases["rounds_s"] = time.perf_counter() - t0
            for t in trainers.values():
                t.close()
        predictions, sim_info = {}, {}
        ok = [n for n in names if "error" not in rows[n]]
        if not args.no_predict and ok:
            log("simulating the same workload (calibrating the roofline on this CPU)...")
            t0 = time.perf_counter()
            try:
                predictions, sim_info = predict({n: configs[n] for n in ok}, prompt_len,
                                                measured_its, args)
            except Exception as e:
                sim_info = {"error": one_line(e)}
                traceback.print_exc(file=sys.stderr)
            phases["predict_s"] = time.perf_counter() - t0

    for n in names:
        if "error" in rows[n]:
            continue
        rows[n] = summarize(n, configs[n], metrics[n])
        rows[n].update(predictions.get(n, {}))
        if "predicted_step_s" in rows[n]:
            rows[n]["predicted_vs_measured"] = (rows[n]["predicted_step_s"]
                                                / rows[n]["timing_s/step"])
    for n in variants:
        cmp = packed_vs_padded(rows, n)
        if cmp is not None:
            rows[f"{n}/packed"]["packed_vs_padded"] = cmp
    for row in rows.values():
        if "error" in row:
            continue
        suffix = row["variant"][len(row["variant"].split("/")[0]):]
        base = rows.get("baseline" + suffix)  # the baseline packed (or not) alike
        if base is not None and "error" not in base:
            row["speedup_vs_baseline"] = row["samples_per_s"] / base["samples_per_s"]
            # Paired per round (the two ran back to back): cancels the load's drift
            # between rounds.
            pairs = [b_ / v for b_, v in zip(base["step_s"], row["step_s"])]
            row["speedup_vs_baseline_per_round"] = pairs
            row["speedup_vs_baseline_paired_median"] = statistics.median(pairs)
            if "predicted_samples_per_s" in row and "predicted_samples_per_s" in base:
                row["predicted_speedup_vs_baseline"] = (row["predicted_samples_per_s"]
                                                        / base["predicted_samples_per_s"])
    gen_share = None
    base = rows.get(next((n for n in names if n.split("/")[0] == "baseline"), ""))
    if base is not None and "error" not in base:
        gen_share = base["timing_s/gen"] / base["timing_s/step"]
    result = {"benchmark": "e2e", "cores": os.cpu_count(), "devices": 2,
              "load_avg": {"start": list(load_start), "end": list(os.getloadavg())},
              "wall_s": time.perf_counter() - t_start, "phases_s": phases,
              "workload": workload, "packed": args.packed,
              "iterations": args.iterations, "warmup_iterations": 1,
              "order": "round-robin: " + " ".join(names) + ", repeated",
              "lengths": lengths, "baseline_gen_share_of_step": gen_share,
              "simulator": sim_info, "rows": list(rows.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    log(f"\nload average (1, 5, 15 min): start {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f}, end {result['load_avg']['end'][0]:.2f}")
    if gen_share is not None:
        log(f"baseline: generation is {gen_share:.0%} of the iteration (median)")
    log("wall " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    log(f"{'variant':>18} {'samples/s':>9} {'x base':>6} {'paired':>6} {'gen':>6} "
        f"{'infer':>6} {'train':>6} {'realloc':>7} {'step':>6} {'util':>5} | "
        f"{'pred step':>9} {'pred/meas':>9}   (measured | predicted)")

    def fmt(v, w: int) -> str:
        return f"{v:{w}.2f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    for row in rows.values():
        if "error" in row:
            log(f"{row['variant']:>18} FAILED: {row['error']}")
            continue
        log(f"{row['variant']:>18} {fmt(row['samples_per_s'], 9)} "
            f"{fmt(row.get('speedup_vs_baseline'), 6)} "
            f"{fmt(row.get('speedup_vs_baseline_paired_median'), 6)} "
            f"{fmt(row['timing_s/gen'], 6)} "
            f"{fmt(row['timing_s/inference'], 6)} {fmt(row['timing_s/train'], 6)} "
            f"{fmt(row['timing_s/realloc'], 7)} {fmt(row['timing_s/step'], 6)} "
            f"{fmt(row['device_utilization'], 5)} | {fmt(row.get('predicted_step_s'), 9)} "
            f"{fmt(row.get('predicted_vs_measured'), 9)}")
    for row in rows.values():
        if "error" in row:
            continue
        log(f"{row['variant']:>18} pad ratio (computed/real tokens): inference "
            f"{row['perf/pad_ratio/inference']:.2f} train {row['perf/pad_ratio/train']:.2f}; "
            f"inference+train {statistics.median(row['infer_train_s']):.2f}s")
        cmp = row.get("packed_vs_padded")
        if cmp:
            log(f"{row['variant']:>18} packed vs padded: inference+train "
                f"{cmp['infer_train_speedup_paired_median']:.2f}x, step "
                f"{cmp['step_speedup_paired_median']:.2f}x (paired medians)")
    if args.json:
        print(json.dumps(result))
    if any("error" in row for row in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
