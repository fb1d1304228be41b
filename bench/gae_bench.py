"""GAE backends side by side: numba kernel vs vectorised torch vs a numpy loop.

    python bench/gae_bench.py [--batch 64] [--length 512] [--repeats 50]

Times are medians over ``--repeats`` calls on one thread, measured in the same run;
the table reports each backend's speed-up over the numpy loop (the baseline a
straightforward implementation would use), so the result is a ratio, not an
absolute time (docs/design.md "Measuring"). Compilation is excluded (one warm-up call).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fusedrl.kernels.gae import HAVE_NUMBA, compute_gae


def numpy_loop(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """Backward loop over time, vectorised over the batch (verl-style reference)."""
    B, T = rewards.shape
    adv = np.zeros_like(rewards)
    last = np.zeros(B, dtype=rewards.dtype)
    next_value = np.zeros(B, dtype=rewards.dtype)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m
        adv[:, t] = last
        next_value = values[:, t] * m
    return adv, (adv + values) * mask


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (numba compile / cache load, torch allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(0)
    B, T = args.batch, args.length
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).float()
    gamma, lam = 1.0, 0.95

    r_np, v_np, m_np = rewards.numpy(), values.numpy(), mask.numpy()
    ref_adv, _ = numpy_loop(r_np, v_np, m_np, gamma, lam)
    runs = {"numpy loop": lambda: numpy_loop(r_np, v_np, m_np, gamma, lam)}
    runs["torch"] = lambda: compute_gae(rewards, values, mask, gamma, lam, backend="torch")
    if HAVE_NUMBA:
        runs["numba"] = lambda: compute_gae(rewards, values, mask, gamma, lam, backend="numba")

    for name in ("torch", "numba"):
        if name in runs:
            adv, _ = runs[name]()
            err = float(np.abs(adv.numpy() - ref_adv).max())
            assert err < 1e-3, f"{name} disagrees with the numpy loop: max abs diff {err}"

    times = {name: median_time(fn, args.repeats) for name, fn in runs.items()}
    base = times["numpy loop"]
    print(f"GAE {B}x{T}, 1 thread, median of {args.repeats}")
    print(f"{'backend':<12}{'speed-up vs numpy loop':>24}")
    for name, t in times.items():
        print(f"{name:<12}{base / t:>23.1f}x")
    if HAVE_NUMBA:
        print(f"numba vs torch: {times['torch'] / times['numba']:.1f}x")


if __name__ == "__main__":
    main()
