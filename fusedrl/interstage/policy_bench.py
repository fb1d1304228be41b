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
"""

from __future__ import annotations

import os
import time


def run(cfg, iterations: int, warmup: int) -> dict:
    """The benchmark on a :class:`~fusedrl.config.Config` that places ``actor_gen`` on
    >= 2 instances with inter-stage fusion on; returns the JSON-ready result."""
    from fusedrl.runtime.launch import make_trainer

    if iterations <= warmup:
        raise ValueError(f"--iterations={iterations}: must exceed the {warmup} warm-up batches")
    load = [round(os.getloadavg()[0], 2)]
    t = make_trainer(cfg)
    try:
        rollout, partial = t.stages.rollout, t.partial
        params = t.sampling_params()
        rows = []
        for it in range(iterations):
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
            rows.append({"seconds": round(dt, 4), "samples": len(out.batch),
                         "tokens": int(out.batch.response_lens.sum()),
                         "rt": out.metrics.get("interstage/rt"),
                         "gen_end_s": round(out.metrics.get("interstage/gen_end_s") or 0.0, 4),
                         **{k.split("/", 1)[1]: v for k, v in metrics.items()}})
    finally:
        t.close()
    load.append(round(os.getloadavg()[0], 2))
    steady = rows[warmup:]
    seconds = sum(r["seconds"] for r in steady)
    out = {
        "policy": cfg.fusion.interstage_policy,
        "iterations": iterations, "warmup": warmup,
        "batch": cfg.ppo.rollout_batch_size * cfg.actor.rollout_n,
        "lengths": cfg.generation.forced_lengths,
        "samples_per_s": round(sum(r["samples"] for r in steady) / seconds, 4),
        "tokens_per_s": round(sum(r["tokens"] for r in steady) / seconds, 4),
        "steady_s": round(seconds, 4),
        "load_avg_start_end": load,
        "batches": rows,
    }
    if partial is not None:
        out["carried_mean"] = round(sum(r["carried"] for r in steady) / len(steady), 3)
        out["staleness_mean"] = round(sum(r["staleness/mean"] for r in steady) / len(steady), 4)
        out["tokens_wasted"] = sum(r["tokens_wasted"] for r in steady)
        out["oversample"] = cfg.fusion.oversample
        out["max_staleness"] = cfg.fusion.max_staleness
    return out
