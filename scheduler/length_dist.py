"""Output-length distributions for simulating generation (numpy only).

RLHF output lengths are long-tailed: on LMSYS-Chat-1M the 99.9th percentile is
more than 10x the median, and samples beyond the 90th percentile take over half of
the generation time (RLHFuse, arXiv 2409.13221 §2). A lognormal fixed by its median
and 99th percentile reproduces that shape. The specs and the random draws are the
same as ``fusedrl.generation.lengths.forced_lengths`` (which the benchmark uses to
force lengths on the real engine), so a simulated and a measured run of one seed
see the same lengths; this copy exists because ``fusedrl.generation`` imports torch
and ``fusedrl.scheduler`` must not.
"""

from __future__ import annotations

import math

import numpy as np

# z-score of the 99th percentile of a standard normal
_Z99 = 2.3263478740408408


def lognormal_sigma(median: float, p99: float) -> float:
    """The lognormal ``sigma`` whose 99th percentile is ``p99`` for this ``median``."""
    if not 0 < median <= p99:
        raise ValueError(f"need 0 < median <= p99, got median={median}, p99={p99}")
    return (math.log(p99) - math.log(median)) / _Z99


def sample_lengths(spec: str, n: int, seed: int = 0, max_len: int | None = None) -> np.ndarray:
    """``n`` lengths from ``fixed:L``, ``uniform:LO,HI`` or ``lognormal:MEDIAN,P99``,
    clipped to ``[1, max_len]``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    kind, _, args = spec.partition(":")
    try:
        nums = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"lengths {spec!r}: arguments must be numbers") from None
    rng = np.random.default_rng(seed)
    if kind == "fixed" and len(nums) == 1:
        values = np.full(n, int(nums[0]), dtype=np.int64)
    elif kind == "uniform" and len(nums) == 2:
        values = rng.integers(int(nums[0]), int(nums[1]) + 1, size=n)
    elif kind == "lognormal" and len(nums) == 2:
        sigma = lognormal_sigma(*nums)
        values = np.rint(rng.lognormal(math.log(nums[0]), sigma, size=n)).astype(np.int64)
    else:
        raise ValueError(f"lengths {spec!r}: expected fixed:L, uniform:LO,HI or "
                         "lognormal:MEDIAN,P99")
    hi = max_len if max_len is not None else int(values.max())
    return np.clip(values, 1, max(1, hi)).astype(np.int64)
