"""``fusedrl bench interstage --policy NAME --iterations N``: one inter-stage policy over
``N`` consecutive batches, as ``fusedrl train`` would run them, without the update.

Each batch is the trainer's: its prompts from the data stream, its output lengths
forced (``generation.forced_lengths``, drawn per iteration), generated and inferred by
the fused rollout stage (:class:`~fusedrl.interstage.rollout.InterStageRollout`), which
re-calibrates its cost model and shows the policy the lengths after each batch (so
``rlhfuse`` re-tunes ``Rt`` as in training). With a partial policy
(:mod:`fusedrl.partial`) the carried samples resume first in the next batch; the weight
version advances by one per batch, as an update would, so the staleness bound acts as
in training. The weights themselves do not change: the benchmark measures the rollout.

Throughput counts the samples of the closed batches only: a carried sample counts
once, in the batch it completes in. ``samples_per_s`` is over the batches after the
first ``warmup`` (the cost model's first calibration, and for ``partial`` the first
carry-over: steady state).

Several policies (``--policy rlhfuse,partial``) share one set of workers and take
turns batch by batch, the order rotating each round, so that a machine whose load
drifts weighs on all of them alike; each keeps its own rollout stage (cost model,
policy state) and carried samples.
"""

from __future__ import annotations

import dataclasses
import os
import time


def _summary(rows: list[dict], warmup: int, cfg) -> dict:
    steady = rows[warmup:]
    seconds = sum(r["seconds"] for r in steady)
    out = {
        "policy": cfg.fusion.interstage_policy,
        "samples_per_s": round(sum(r["samples"] for r in steady) / seconds, 4),
        "tokens_per_s": round(sum(r["tokens"] for r in steady) / seconds, 4),
        "steady_s": round(seconds, 4),
    }
    if "carried" in rows[0]:
        out["carried_mean"] = round(sum(r["carried"] for r in steady) / len(steady), 3)
        out["staleness_mean"] = round(sum(r["staleness/mean"] for r in steady) / len(steady), 4)
        out["tokens_wasted"] = sum(r["tokens_wasted"] for r in steady)
        out["oversample"] = cfg.fusion.oversample
        out["max_staleness"] = cfg.fusion.max_staleness
    return out


def run(cfg, iterations: int, warmup: int, policies: list[str] | None = None) -> dict:
    """The benchmark on a :class:`~fusedrl.config.Config` that places ``actor_gen`` on
    >= 2 instances with inter-stage fusion on; ``policies`` (default: the config's)
    take turns batch by batch. Returns the JSON-ready result."""
    from fusedrl.interstage.rollout import InterStageRollout
    from fusedrl.partial import PartialRollouts
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.scheduler.partial import is_partial

    if iterations <= warmup:
        raise ValueError(f"--iterations={iterations}: must exceed the {warmup} warm-up batches")
    names = policies or [cfg.fusion.interstage_policy]
    cfgs = [dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion,
                                                                interstage_policy=name))
            for name in names]
    load = [round(os.getloadavg()[0], 2)]
    t = make_trainer(cfgs[0])
    rows: list[list[dict]] = [[] for _ in names]
    try:
        rollouts = [t.stages.rollout] + [InterStageRollout(t.stages.cluster, c, t.setup)
                                         for c in cfgs[1:]]
        partials = [PartialRollouts(c) if is_partial(c.fusion.interstage_policy) else None
                    for c in cfgs]
        params = t.sampling_params()
        for it in range(iterations):
            for k in [(it + j) % len(names) for j in range(len(names))]:  # rotating order
                rollout, partial = rollouts[k], partials[k]
                t0 = time.perf_counter()
                if partial is not None:
                    requests, close = partial.begin(
                        it, lambda first, count, it=it: t.stream_requests(it, first, count))
                    out = rollout.run(requests, params, close=close)
                    _, metrics = partial.end(out, it)
                else:
                    out = rollout.run(t.requests(it, t.prompt_indices(it)), params)
                    metrics = {}
                dt = time.perf_counter() - t0
                t.stages.take_events()  # keep the event log from growing
                rows[k].append({
                    "seconds": round(dt, 4), "samples": len(out.batch),
                    "tokens": int(out.batch.response_lens.sum()),
                    "rt": out.metrics.get("interstage/rt"),
                    "gen_end_s": round(out.metrics.get("interstage/gen_end_s") or 0.0, 4),
                    **{key.split("/", 1)[1]: v for key, v in metrics.items()}})
    finally:
        t.close()
    load.append(round(os.getloadavg()[0], 2))
    common = {"iterations": iterations, "warmup": warmup,
              "batch": cfg.ppo.rollout_batch_size * cfg.actor.rollout_n,
              "lengths": cfg.generation.forced_lengths, "load_avg_start_end": load}
    if len(names) == 1:
        return {**_summary(rows[0], warmup, cfgs[0]), **common, "batches": rows[0]}
    summaries = {name: {**_summary(r, warmup, c), "batches": r}
                 for name, r, c in zip(names, rows, cfgs)}
    base = summaries[names[0]]["samples_per_s"]
    return {**common, "policies": summaries,
            "samples_per_s": {n: summaries[n]["samples_per_s"] for n in names},
            f"ratio_vs_{names[0]}": {n: round(summaries[n]["samples_per_s"] / base, 4)
                                     for n in names}}
