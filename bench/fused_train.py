"""Intra-stage fusion end to end (RLHFuse §5): wall time of the PPO training call with
actor and critic in one fused pipeline schedule vs the actor's 1F1B then the critic's,
on 2 workers with pp=2 for both models (critic stages reversed: its stage 0 on device 1),
measured as a ratio in one run (docs/design.md "Measuring").

    .venv/bin/python bench/fused_train.py [--reps 5] [--preset small] [--micro 8] [--json OUT]

One trainer (``fusion.intrastage=true``), one rollout: after a normal first iteration
(generation, inference, and a fused training call that profiles the stages and solves
the schedule), the same update (``update.train(batch, targets, schedule)``) runs
``--reps`` times with the fused stage and with a sequential 1F1B stage on the same
workers, alternated (fused, sequential, sequential, fused, ...; one warm-up pair not
counted), so that background load on a shared machine hits both alike. The optimizer
steps of every call change the weights but not the shapes, so every call does the same
work.

Reported, per mode: the measured call times and their ratio; the scheduler's
*predicted* ratio (fused makespan / sequential 1F1B makespan from the profiled stage
times) beside it; and where the difference goes, from the per-device events of each
call (:mod:`fusedrl.timeline`): the forward/backward span of the call, the seconds
inside the tasks (``compute``), the seconds waiting for another stage's message
(``wait``), and the rest of the call (optimizer steps, gradient reduction, loss
bookkeeping, dispatch) that no pipeline schedule changes. ``predicted_pipeline_ms``
is the schedule's makespan in profiled milliseconds: the span the executor would reach
with no waits beyond the schedule's own and tasks as fast as profiled. Beside the
profile, ``measured_task_ms`` is each fused task's mean duration in the timed calls
(per pipeline and stage), and per mode ``worker_usage`` the workers' CPU seconds (user,
system) and minor page faults per call (``getrusage``), which separate a task that
waits for a core (wall > CPU: another process ran) from one that does more work, and
``other_processes_cpu_s`` the CPU seconds the rest of the host took during each call
(``/proc/stat`` less the workers and this process): near 0 on a quiet machine.

The scheduler's timing model takes the devices as independent. Two CPU "devices" that
share a physical core (two SMT vCPUs) or anything else slow each other down while both
compute, and the fused schedule, which keeps both busy, pays that where sequential
1F1B's bubbles do not. ``predicted_shared_core`` measures that slowdown (each worker's
stage passes alone, then both workers at once) and replays both task lists with it
(:func:`fusedrl.pipeline.fused_plan.shared_core_makespan`): the prediction that
accounts for it, beside the independent-device one.

With pp=2 the fused schedule can win at most ``(M + 1) * 2 / (2M)`` over sequential
1F1B (each pipeline's one-stage bubble), so fewer micro-batches per model (``--micro``
larger at a fixed ``--batch``) show more of fusion; ``--micro 8`` (4 per model) is the
default.
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
    from fusedrl.runtime.launch import make_trainer as build

    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.max_prompt_len=8",
        f"generation.max_new_tokens={args.new_tokens}", f"ppo.rollout_batch_size={args.batch}",
        f"ppo.mini_batch_size={args.batch}", f"ppo.micro_batch_size={args.micro}",
        "ppo.ppo_epochs=1", "cluster.devices=2", "placement.default=dp1tp1pp2@0-1",
        "placement.critic_train=dp1tp1pp2@1,0", "placement.critic_infer=dp1tp1pp2@1,0",
        "fusion.intrastage=true", "fusion.interstage=false", "trainer.iterations=1",
        # --micro fixes each model's micro-batch count (the schedule's subject here);
        # token budgets with packing would merge micro-batches (one per model at --micro 16)
        *([] if args.packed else ["ppo.packed=false", "ppo.micro_batch_tokens=0"])])
    return build(cfg)


def breakdown(events, seconds: float) -> dict:
    """Per device: span of the training events, seconds in them, the waits between them."""
    out = {}
    for d in sorted({e.device for e in events}):
        mine = sorted((e for e in events if e.device == d and e.stage == "train"), key=lambda e: e.start)
        if not mine:
            continue
        busy = sum(e.end - e.start for e in mine)
        span = max(e.end for e in mine) - mine[0].start
        out[str(d)] = {"span_s": span, "compute_s": busy, "wait_s": span - busy,
                       "outside_pipeline_s": seconds - span, "events": len(mine)}
    return out


def usage(workers) -> list[tuple[float, float, int]]:
    """Per worker process: CPU seconds in user and system mode, minor page faults."""
    import ray

    def get(_self):
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt

    return ray.get([w.__ray_call__.remote(get) for w in workers])


def host_busy_s() -> float:
    """CPU seconds all processes of this host have run so far (Linux ``/proc/stat``;
    0 elsewhere): less the workers' and this process's own, what other processes took."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def task_ms(events, smap) -> dict:
    """Mean duration of the fused calls' tasks per ``{pipeline}{stage}`` and kind, in ms
    (device ``d`` holds actor stage ``d`` and the critic stage ``smap`` puts there)."""
    critic_stage = {node: s for s, node in enumerate(smap)}
    acc: dict[str, list[float]] = {}
    for e in events:
        kind, _, name = e.call.partition(":")
        if kind not in ("F", "B") or name not in ("actor", "critic"):
            continue
        stage = e.device if name == "actor" else critic_stage[e.device]
        acc.setdefault(f"{name}{stage}:{kind}", []).append(1e3 * (e.end - e.start))
    return {k: statistics.mean(v) for k, v in sorted(acc.items())}


def contention(workers, bref, idx, repeats: int = 8) -> dict:
    """What two devices computing at once cost each other: each worker times its stages
    (median of ``repeats`` passes, :func:`fusedrl.pipeline.fused.profile_stage`) alone,
    one worker after the other, then both at once; ``slowdown`` is the mean ratio."""
    import ray

    def prof(self, b, i):
        from fusedrl.intrastage.training import worker_profile

        out = worker_profile(self, b, i, repeats, "median")["stages"].values()
        return sum(f + bw for _, _, f, bw, _ in out)

    alone = [ray.get(w.__ray_call__.remote(prof, bref, idx)) for w in workers]
    both = ray.get([w.__ray_call__.remote(prof, bref, idx) for w in workers])
    return {"alone_s": alone, "together_s": both,
            "slowdown": statistics.mean(b / a for a, b in zip(alone, both))}


def measure(args) -> dict:
    from fusedrl.runtime.stages import RayUpdate

    t = make_trainer(args)
    fused = t.stages.update
    captured = []
    train = fused.train

    def capture(*a):
        captured.append(a)
        return train(*a)

    fused.train = capture
    try:
        first = t.step()  # generation, inference, fused train (profile + solve)
        fused.train = train
        sequential = RayUpdate(t.stages.cluster, t.config, fused=False)
        modes = {"fused": fused, "sequential": sequential}
        times = {"fused": [], "sequential": []}
        parts = {"fused": [], "sequential": []}
        use = {"fused": [], "sequential": []}
        others = {"fused": [], "sequential": []}  # CPU s of other processes per call
        fused_events = []
        workers = [t.stages.cluster.workers[d] for d in sorted(fused.fused.actor.devices)]
        t.stages.take_events()
        for rep in range(args.reps + 1):
            for mode in ("fused", "sequential") if rep % 2 == 0 else ("sequential", "fused"):
                u0 = usage(workers)
                h0, p0 = host_busy_s(), time.process_time()
                t0 = time.perf_counter()
                modes[mode].train(*captured[0])
                dt = time.perf_counter() - t0
                h1, p1 = host_busy_s(), time.process_time()
                u1 = usage(workers)
                events = t.stages.take_events()
                if rep > 0:
                    times[mode].append(dt)
                    parts[mode].append(breakdown(events, dt))
                    use[mode].append([[b - a for a, b in zip(x, y)] for x, y in zip(u0, u1)])
                    mine = sum(b - a for x, y in zip(u0, u1) for a, b in zip(x[:2], y[:2]))
                    others[mode].append(max(0.0, (h1 - h0) - mine - (p1 - p0)))
                    if mode == "fused":
                        fused_events += events
        ft = fused.fused
        shape = next(iter(ft.results))
        res = ft.results[shape]
        seq_ms = res["baseline"]["sequential_1f1b"]["makespan"]
        # the scheduler's timing model assumes independent devices; with the measured
        # cost of computing at once, the same task lists give (fusedrl.pipeline.fused_plan)
        import ray
        from fusedrl.pipeline.fused_plan import sequential_tasks, shared_core_makespan

        shared = contention(workers, ray.put(captured[0][0]), captured[0][2][0][0])
        k = max(1.0, shared["slowdown"])  # below 1 is timing noise: independent devices
        shared["fused_ms"] = 1e3 * shared_core_makespan(ft.plans[shape], ft.smap, ft.profile, k)
        shared["sequential_ms"] = 1e3 * shared_core_makespan(
            sequential_tasks(ft.smap, shape), ft.smap, ft.profile, k)
        shared["ratio"] = shared["fused_ms"] / shared["sequential_ms"]
        out = {
            "microbatches_per_model": list(shape),
            "profile_ms": {k: [{"fwd": 1e3 * f, "bwd": 1e3 * b, "mem_mib": m / 2 ** 20} for f, b, m in v]
                           for k, v in ft.profile.items()},
            "solve_seconds": ft.solve_seconds,
            "predicted_pipeline_ms": {"fused": res["makespan"], "sequential": seq_ms},
            "predicted_ratio_fused_over_sequential": res["makespan"] / seq_ms,
            "predicted_peak_memory_mib": {"fused": res["peak_memory"],
                                          "sequential": res["baseline"]["sequential_1f1b"]["peak_memory"]},
            "lower_bound_ratio": res["makespan"] / res["lower_bound"],
            "predicted_shared_core": shared,
            "measured_task_ms": task_ms(fused_events, fused.fused.smap),
            "worker_usage": {mode: {k: statistics.mean(sum(w[i] for w in call) / len(call) for call in u)
                                    for i, k in enumerate(("user_s", "system_s", "minor_faults"))}
                             for mode, u in use.items() if u},
            "other_processes_cpu_s": {mode: statistics.mean(v) for mode, v in others.items() if v},
            "first_iteration_train_s": first["timing_s/train"],
            "fused_s": times["fused"], "sequential_s": times["sequential"],
            "per_call": parts,
        }
    finally:
        t.close()
    out["ratio_fused_over_sequential"] = sum(times["fused"]) / sum(times["sequential"])
    out["pair_ratios"] = [f / s for f, s in zip(times["fused"], times["sequential"])]
    out["median_pair_ratio"] = statistics.median(out["pair_ratios"])
    # Means over calls and devices: where the measured time goes.
    for mode in ("fused", "sequential"):
        rows = [dev for call in parts[mode] for dev in call.values()]
        if rows:
            out[f"{mode}_mean"] = {k: statistics.mean(r[k] for r in rows)
                                   for k in ("span_s", "compute_s", "wait_s", "outside_pipeline_s")}
    if "fused_mean" in out and "sequential_mean" in out:
        out["span_ratio_fused_over_sequential"] = out["fused_mean"]["span_s"] / out["sequential_mean"]["span_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--packed", action="store_true",
                   help="packed token-budget micro-batches (the run's default) instead of --micro samples each")
    p.add_argument("--json", default="")
    args = p.parse_args()
    t0 = time.time()
    load0 = os.getloadavg()[0]
    with local_ray():
        res = measure(args)
    result = {"cores": os.cpu_count(), "load_average_1m": [load0, os.getloadavg()[0]],
              "preset": args.preset, "batch": args.batch, "micro_batch": args.micro, "packed": args.packed,
              "new_tokens": args.new_tokens, **res, "wall_s": time.time() - t0}
    fm, sm = res.get("fused_mean", {}), res.get("sequential_mean", {})
    print(f"train call: fused {sum(res['fused_s']):.2f} s, sequential {sum(res['sequential_s']):.2f} s "
          f"over {args.reps} reps each; measured ratio fused/sequential = "
          f"{res['ratio_fused_over_sequential']:.3f} (median pair {res['median_pair_ratio']:.3f}); "
          f"predicted {res['predicted_ratio_fused_over_sequential']:.3f}; load {load0:.1f}", file=sys.stderr)
    if fm and sm:
        print(f"per device and call (mean s): fused span {fm['span_s']:.3f} = compute {fm['compute_s']:.3f} "
              f"+ wait {fm['wait_s']:.3f}, outside {fm['outside_pipeline_s']:.3f}; sequential span "
              f"{sm['span_s']:.3f} = compute {sm['compute_s']:.3f} + wait {sm['wait_s']:.3f}, outside "
              f"{sm['outside_pipeline_s']:.3f}; predicted pipeline ms fused "
              f"{res['predicted_pipeline_ms']['fused']:.0f}, sequential "
              f"{res['predicted_pipeline_ms']['sequential']:.0f}", file=sys.stderr)
    prof = {f"{name}{st}:{k}": p[k] for name, stages in res["profile_ms"].items()
            for st, p in enumerate(stages) for k in ("fwd", "bwd")}
    tasks = {k.replace(":F", ":fwd").replace(":B", ":bwd"): v for k, v in res["measured_task_ms"].items()}
    print("task ms, profiled -> measured in the fused calls: " + ", ".join(
        f"{k} {prof[k]:.0f}->{tasks[k]:.0f}" for k in sorted(prof) if k in tasks), file=sys.stderr)
    sh = res["predicted_shared_core"]
    print(f"two devices computing at once run {sh['slowdown']:.2f}x slower each (stage passes alone "
          f"{', '.join(f'{x:.3f}' for x in sh['alone_s'])} s, together "
          f"{', '.join(f'{x:.3f}' for x in sh['together_s'])} s); with that, predicted pipeline ms "
          f"fused {sh['fused_ms']:.0f}, sequential {sh['sequential_ms']:.0f}, ratio {sh['ratio']:.3f}",
          file=sys.stderr)
    for mode, u in res["worker_usage"].items():
        print(f"{mode}: per worker and call {u['user_s']:.3f} s user + {u['system_s']:.3f} s system CPU, "
              f"{u['minor_faults']:.0f} minor page faults; other processes (Ray's own included) "
              f"{res['other_processes_cpu_s'][mode]:.3f} CPU s per call", file=sys.stderr)
    emit(result, args.json)


if __name__ == "__main__":
    main()
