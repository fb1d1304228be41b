"""``fusedrl bench``: benchmarks on the real engine and runtime.

``fusedrl bench interstage`` measures inter-stage fusion (RLHFuse, arXiv 2409.13221
§4): one batch's generation + inference (old and reference log-probs, critic values)
on ``--devices`` Ray workers (one core each, docs/design.md "Measuring"), every call placed
``dp{N}tp1pp1`` on all of them, output lengths forced (``ignore_eos`` and a
``max_new_tokens`` per sample, :func:`fusedrl.generation.lengths.forced_lengths`).

1. Calibration: one fused run at the policy's starting ``Rt`` (20% of the batch); its
   timed decode steps and inference calls fit the cost model
   (:meth:`FusedRollout.calibrate`), and the ``rlhfuse`` policy sees the lengths.
2. ``rt``: the policy's choice, by simulating Rt = 0 and 5%..95% of the batch over the
   observed lengths with that model.
3. Measurement: ``--repeats`` rounds, each timing the unfused path (the runtime's
   generate on every instance, then its inference) and the fused one at ``rt``, side
   by side, alternating which goes first; the medians are reported.
4. ``--sweep``: the fused run at every candidate ``Rt``, to compare the simulator's
   choice with the best one measured on the real engine.
5. ``--migration kv|reprefill|auto``: the fused run's ``fusion.migration``, and both
   migration paths measured side by side at ``rt`` (``--repeats`` rounds of ``kv``,
   ``reprefill`` and ``auto``, the order rotating): per path the fused seconds,
   samples/s, the destinations' resume seconds (KV received and imported, or
   re-prefilled, and the step giving the migrated samples their next token) and the
   transfer seconds; which method ``auto``'s cost model picked and whether it is the
   faster one measured (:mod:`fusedrl.interstage.kv_migration`).

``--policy NAME --iterations N``: instead, ``N`` consecutive batches with one
``fusion.interstage_policy`` (``none``, ``rlhfuse``, ``partial`` or a registered one),
lengths drawn per batch; ``samples_per_s`` in steady state, a carried sample counted
once, when it completes (:mod:`fusedrl.interstage.policy_bench`). ``--policy
rlhfuse,partial``: the policies take turns batch by batch on the same workers, and
their ratios to the first are reported.

Output (``--json``): ``{"unfused_s", "fused_s", "speedup", "rt", "migrated",
"sim_speedup", "sweep": {Rt: seconds}, "best_rt", "migration": {...}, ...}``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import List, Optional

import typer

from fusedrl.cli.common import fail, first_line, json_option

bench = typer.Typer(add_completion=False, no_args_is_help=True,
                    help="Benchmarks on the real engine (fused vs unfused, side by side).")


@bench.command("interstage")
def interstage(
    devices: int = typer.Option(2, "--devices", help="Generation instances = devices "
                                "(one Ray worker and one core each)."),
    lengths: str = typer.Option("lognormal:16,160", "--lengths", help="Output lengths: a "
                                "file with one integer per line, fixed:L, uniform:LO,HI or "
                                "lognormal:MEDIAN,P99."),
    batch: int = typer.Option(32, "--batch", help="Samples in the batch."),
    model: str = typer.Option("small", "--model", help="Model preset (from scratch)."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Inference micro-batch size."),
    steps: int = typer.Option(4, "--steps", help="Engine steps per controller round trip."),
    repeats: int = typer.Option(3, "--repeats", help="Side-by-side rounds; medians reported."),
    sweep: bool = typer.Option(False, "--sweep", help="Also measure every candidate Rt."),
    seed: int = typer.Option(0, "--seed", help="Seed of the lengths and of sampling."),
    migration: Optional[str] = typer.Option(None, "--migration", help="kv, reprefill or "
                                            "auto: fusion.migration, and both migration "
                                            "paths measured side by side."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Run --iterations consecutive "
                                         "batches with this fusion.interstage_policy (none, "
                                         "rlhfuse, partial or a registered one) and report "
                                         "samples_per_s in steady state; several, comma-"
                                         "separated, take turns batch by batch."),
    iterations: int = typer.Option(8, "--iterations", help="With --policy: batches run."),
    warmup: int = typer.Option(2, "--warmup", help="With --policy: first batches left out "
                               "of samples_per_s."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Config override key=value."),
    as_json: bool = json_option(),
) -> None:
    """Generation + inference of one batch, unfused vs inter-stage fused (RLHFuse §4)."""
    from fusedrl.config import load_config
    from fusedrl.generation.lengths import forced_lengths

    if devices < 2:
        fail(f"--devices={devices}: inter-stage fusion needs at least 2 instances")
    if batch < devices:
        fail(f"--batch={batch}: need at least one sample per device")
    if repeats < 1:
        fail(f"--repeats={repeats}: must be >= 1")
    if policy is not None:  # one policy over consecutive batches (fusedrl.interstage.policy_bench)
        from fusedrl.interstage import policy_bench

        if iterations <= warmup or warmup < 0:
            fail(f"--iterations={iterations}: must exceed --warmup={warmup} (>= 0)")
        from fusedrl.scheduler.interstage import available_policies

        names = [p.strip() for p in policy.split(",")]
        for name in names:
            if name not in available_policies():
                fail(f"--policy={name}: known policies: {', '.join(available_policies())}")
        if len(set(names)) != len(names):
            fail(f"--policy={policy}: a policy is named twice")
        try:
            # the length cap: far beyond the spec's p99, so lengths are as drawn
            cap = max(forced_lengths(lengths, 4096, seed=seed))
            cfg = load_config(None, [
                f"model.preset={model}", f"cluster.devices={devices}",
                f"placement.default=dp{devices}tp1pp1@0-{devices - 1}",
                f"generation.max_new_tokens={cap}", f"generation.max_batch_size={batch}",
                f"generation.forced_lengths={lengths}", "fusion.interstage=true",
                f"fusion.interstage_steps={steps}", f"fusion.interstage_policy={names[0]}",
                f"ppo.rollout_batch_size={batch}", f"ppo.mini_batch_size={batch}",
                f"ppo.micro_batch_size={micro_batch}", f"data.num_prompts={batch}",
                f"trainer.seed={seed}"] + list(set_ or []))
        except ValueError as e:
            fail(first_line(e))
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        result = policy_bench.run(cfg, iterations, warmup, names)
        typer.echo(json.dumps(result) if as_json else
                   "\n".join(f"{k}: {v}" for k, v in result.items()))
        return
    if migration is not None and migration not in ("kv", "reprefill", "auto"):
        fail(f"--migration={migration}: must be one of kv, reprefill, auto")
    try:
        lens = forced_lengths(lengths, batch, seed=seed)
        cfg = load_config(None, [
            f"model.preset={model}", f"cluster.devices={devices}",
            f"placement.default=dp{devices}tp1pp1@0-{devices - 1}",
            f"generation.max_new_tokens={max(lens)}", f"generation.max_batch_size={batch}",
            "fusion.interstage=true", f"fusion.interstage_steps={steps}",
            f"ppo.rollout_batch_size={batch}", f"ppo.mini_batch_size={batch}",
            f"ppo.micro_batch_size={micro_batch}", f"data.num_prompts={batch}",
            f"trainer.seed={seed}"]
            + ([f"fusion.migration={migration}"] if migration else []) + list(set_ or []))
    except ValueError as e:
        fail(first_line(e))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = _run(cfg, lens, lengths, repeats, sweep, compare_migration=migration is not None)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for k, v in result.items():
            typer.echo(f"{k}: {v}")


def _run(cfg, lens: list[int], spec: str, repeats: int, sweep: bool,
         compare_migration: bool = False) -> dict:
    from fusedrl.generation import Request, SamplingParams
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.runtime.stages import RayRollout

    t = make_trainer(cfg)
    try:
        fused = t.stages.rollout
        plain = RayRollout(t.stages.cluster, cfg, t.setup)
        prompts = t.setup.prompt_ids
        requests = [Request(j, list(prompts[j % len(prompts)]), max_new_tokens=n)
                    for j, n in enumerate(lens)]
        params = SamplingParams(temperature=cfg.generation.temperature,
                                max_new_tokens=max(lens), seed=cfg.trainer.seed,
                                ignore_eos=True)
        n = len(requests)

        def unfused() -> float:
            t0 = time.perf_counter()
            plain.run(requests, params)
            return time.perf_counter() - t0

        def fused_at(rt: int) -> tuple[float, dict]:
            from fusedrl.timeline import stage_overlap, stage_spans

            t.stages.take_events()  # the measured spans of this run only
            t0 = time.perf_counter()
            res = fused.run_fused(requests, params, threshold=rt)
            dt = time.perf_counter() - t0
            events = t.stages.take_events()
            spans = stage_spans(events)
            return dt, {**res.metrics, "timing_s/gen": spans.get("gen", 0.0),
                        "timing_s/inference": spans.get("inference", 0.0),
                        "timing_s/gen_inference_overlap":
                            stage_overlap(events, "gen", "inference") or 0.0}

        # 1. warm-up and calibration on the real engine
        unfused()
        warm = fused.run_fused(requests, params)
        fused.observe(warm)
        # 2. the policy's Rt: simulated over the observed lengths (RLHFuse §4)
        rt = fused.policy.tune(n) if hasattr(fused.policy, "tune") else \
            fused.policy.threshold(n)
        sim = dict(getattr(fused.policy, "last_sweep", {}))
        # 3. side by side, alternating the order
        times_u, times_f, metrics = [], [], []
        for r in range(repeats):
            if r % 2 == 0:
                times_u.append(unfused())
                dt, m = fused_at(rt)
            else:
                dt, m = fused_at(rt)
                times_u.append(unfused())
            times_f.append(dt)
            metrics.append(m)
        u, f = statistics.median(times_u), statistics.median(times_f)
        m = metrics[times_f.index(sorted(times_f)[len(times_f) // 2])] if repeats % 2 else \
            metrics[-1]
        out = {
            "unfused_s": round(u, 4), "fused_s": round(f, 4), "speedup": round(u / f, 4),
            "rt": rt, "migrated": m["interstage/migrated"],
            "migrate_at_s": round(m["interstage/migrate_at_s"], 4),
            "gen_s": round(m["timing_s/gen"], 4), "inference_s": round(m["timing_s/inference"], 4),
            "overlap_s": round(m["timing_s/gen_inference_overlap"], 4),
            "devices": len(fused.instances), "batch": n, "lengths": spec,
            "median_len": statistics.median(lens), "max_len": max(lens),
            "p99_len": sorted(lens)[min(n - 1, int(0.99 * n))],
            "unfused_runs_s": [round(x, 4) for x in times_u],
            "fused_runs_s": [round(x, 4) for x in times_f],
        }
        if sim:
            out["sim_unfused_s"] = round(sim.get(0, float("nan")), 4)
            out["sim_fused_s"] = round(sim[rt], 4)
            out["sim_speedup"] = round(sim.get(0, float("nan")) / sim[rt], 4)
            c = fused.cost
            out["cost_model"] = {"decode_base_s": c.decode_base_s,
                                 "decode_per_seq_s": c.decode_per_seq_s,
                                 "decode_per_ctx_token_s": c.decode_per_ctx_token_s,
                                 "bs_max": c.bs_max, "prefill_per_token_s":
                                 c.prefill_per_token_s, "infer_per_token_s": c.infer_per_token_s}
        # 4. the simulator's Rt against the best measured one
        if sweep:
            cands = (fused.policy.candidate_thresholds(n)
                     if hasattr(fused.policy, "candidate_thresholds") else [0, rt])
            measured = {c: round(fused_at(c)[0], 4) for c in cands}
            best = min(measured, key=lambda c: (measured[c], c))
            out.update(sweep=measured, best_rt=best, best_s=measured[best],
                       rt_measured_s=measured.get(rt),
                       sim_rt_vs_best=round(measured.get(rt, f) / measured[best], 4),
                       sim_sweep={k: round(v, 4) for k, v in sim.items()})
        if compare_migration:
            out["migration"] = _compare_migration(fused, fused_at, rt, repeats, n)
        return out
    finally:
        t.close()


def _compare_migration(fused, fused_at, rt: int, repeats: int, n: int) -> dict:
    """Both migration paths at ``rt``, side by side (``repeats`` rounds of ``kv``,
    ``reprefill`` and ``auto``, the order rotating), and whether ``auto``'s cost model
    (the simulator's, its transfer terms measured) picked the faster one."""
    mode = fused.migration
    if len({b for b, _ in fused.kv_points}) < 2:  # run started with reprefill: probe now
        fused.kv_points.extend(fused._probe_transfer(int(fused.cost.kv_bytes_per_token)))
    load = [os.getloadavg()[0]]
    runs: dict[str, list] = {"kv": [], "reprefill": [], "auto": []}
    paths = list(runs)
    try:
        for r in range(repeats):
            for path in paths[r % 3:] + paths[:r % 3]:
                fused.migration = path
                if path == "auto":
                    fused.calibrate()  # transfer terms from every transfer so far
                runs[path].append(fused_at(rt))
    finally:
        fused.migration = mode
    load.append(os.getloadavg()[0])

    def med(path: str, key: str) -> float:
        return statistics.median(m[key] for _, m in runs[path])

    out: dict = {"mode": mode, "rt": rt, "load_avg_1m": [round(x, 2) for x in load]}
    for path, rs in runs.items():
        secs = statistics.median(dt for dt, _ in rs)
        out[path] = {"fused_s": round(secs, 4), "samples_per_s": round(n / secs, 3),
                     "resume_s": round(med(path, "interstage/migration_resume_s"), 5),
                     "transfer_s": round(med(path, "interstage/kv_transfer_s"), 5),
                     "export_s": round(med(path, "interstage/migration_export_s"), 5),
                     "gen_end_s": round(med(path, "interstage/gen_end_s"), 4),
                     "migrated_kv": med(path, "interstage/migrated_kv"),
                     "migrated_reprefill": med(path, "interstage/migrated_reprefill"),
                     "fused_runs_s": [round(dt, 4) for dt, _ in rs]}
    kv, re = out["kv"], out["reprefill"]
    out["resume_ratio_reprefill_over_kv"] = (round(re["resume_s"] / kv["resume_s"], 4)
                                             if kv["resume_s"] > 0 else None)
    out["samples_per_s_ratio_kv_over_reprefill"] = round(
        kv["samples_per_s"] / re["samples_per_s"], 4)
    # the two paths of one round ran back to back: their ratio cancels slow load drift
    paired = [r[0] / k[0] for k, r in zip(runs["kv"], runs["reprefill"])]
    out["samples_per_s_ratio_kv_over_reprefill_paired"] = round(statistics.median(paired), 4)
    out["paired_ratios"] = [round(x, 4) for x in paired]
    a = out["auto"]
    picked = (None if not a["migrated_kv"] + a["migrated_reprefill"]  # no migration
              else "kv" if a["migrated_kv"] > a["migrated_reprefill"] else "reprefill")
    faster = (None if not (kv["migrated_kv"] and re["migrated_reprefill"])
              else "kv" if kv["resume_s"] <= re["resume_s"] else "reprefill")
    c = fused.cost
    out.update(auto_picked=picked, faster_resume=faster,
               auto_picked_faster=None if None in (picked, faster) else picked == faster,
               cost_model={"transfer_latency_s": c.transfer_latency_s,
                           "transfer_bandwidth": c.transfer_bandwidth,
                           "kv_bytes_per_token": c.kv_bytes_per_token,
                           "prefill_base_s": c.prefill_base_s,
                           "prefill_per_token_s": c.prefill_per_token_s})
    return out
