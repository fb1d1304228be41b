"""Weight sync from training to vLLM in the Ray runtime: colocated vs separated.

    .venv-vllm/bin/python bench/vllm_sync.py [--model pkg:smollm2-135m-instruct] [--repeats 3]
                              [--out bench/results/vllm_sync.json]

Needs vLLM (``make install-vllm``; run with ``.venv-vllm/bin/python``). Two runtimes on
2 workers, actor training on device 0:

- ``colocated``: ``actor_gen`` placed as ``actor_train`` (device 0): the vLLM engine on
  device 0 loads the training shard in place; nothing crosses devices;
- ``separated``: ``actor_gen`` on device 1: the reallocation engine sends device 0's
  weights to device 1's copy over the worker group, which vLLM then loads in place.

For each, ``--repeats`` syncs (``RayCluster.sync`` of the step's
pairs, exactly what follows every training step) are timed: ``timing_s/realloc`` is the
controller's wall time of one sync, ``timing_s/realloc_backend_load`` its load into
vLLM, ``perf/realloc_bytes`` the bytes that crossed devices. The weights are the same on
every sync (no training in between): the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "colocated": ["placement.default=dp1tp1pp1@0"],
    "separated": ["placement.default=dp1tp1pp1@0", "placement.actor_gen=dp1tp1pp1@1"],
}


def measure(model: str, variant: str, repeats: int) -> dict:
    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer

    cfg = load_config(None, ([f"model.path={model}"] if model else []) + [
                             "generation.backend=vllm",
                             "cluster.devices=2", "data.max_prompt_len=64",
                             "generation.max_new_tokens=24", "generation.max_batch_size=16",
                             "data.chat_template=true", "data.task=arithmetic"]
                      + VARIANTS[variant])
    t = make_trainer(cfg)
    try:
        rows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cluster = t.stages.cluster
            out = cluster.sync(cluster.step_pairs)
            rows.append({"timing_s/realloc": time.perf_counter() - t0, **out})
    finally:
        t.close()
    keys = rows[0].keys()
    return {"variant": variant, "repeats": rows,
            **{k: statistics.median(r[k] for r in rows) for k in keys}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pkg:smollm2-135m-instruct",
                    help="model.path; empty: the default config's preset (tiny, random)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="colocated,separated")
    ap.add_argument("--out", default="bench/results/vllm_sync.json")
    args = ap.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print(json.dumps({"skipped": "vLLM is not installed: make install-vllm, then run "
                                     "with .venv-vllm/bin/python"}))
        return 0
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = [measure(args.model, v, args.repeats) for v in args.variants.split(",")]
    finally:
        ray.shutdown()
    print(f"{'variant':<10} {'realloc s':>10} {'vLLM load s':>12} {'bytes moved':>12}")
    for r in results:
        print(f"{r['variant']:<10} {r['timing_s/realloc']:>10.3f} "
              f"{r['timing_s/realloc_backend_load']:>12.3f} {r['perf/realloc_bytes']:>12,}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
