"""Forced output lengths for benchmark mode (``ignore_eos`` + a length per sample), as
vLLM's benchmarks do: from a list, a file with one integer per line, or a distribution."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# z-score of the 99th percentile of a standard normal
_Z99 = 2.3263478740408408


def forced_lengths(spec: str | list[int], n: int, seed: int = 0, max_len: int | None = None
                   ) -> list[int]:
    """``n`` output lengths from ``spec``.

    - a list of ints, or a path to a file with one integer per line (cycled to ``n``);
    - ``fixed:L``;
    - ``uniform:LO,HI``;
    - ``lognormal:MEDIAN,P99`` (long-tailed, like LMSYS-Chat-1M output lengths whose
      p99.9 is >10x the median, RLHFuse §2).
    Lengths are clipped to [1, max_len].
    """
    rng = np.random.default_rng(seed)
    if isinstance(spec, list):
        values = np.resize(np.asarray(spec, dtype=np.int64), n)
    elif ":" in spec and spec.split(":", 1)[0] in ("fixed", "uniform", "lognormal"):
        kind, args = spec.split(":", 1)
        try:
            nums = [float(a) for a in args.split(",")]
        except ValueError:
            raise ValueError(f"lengths {spec!r}: arguments must be numbers") from None
        if kind == "fixed" and len(nums) == 1:
            values = np.full(n, int(nums[0]))
        elif kind == "uniform" and len(nums) == 2:
            values = rng.integers(int(nums[0]), int(nums[1]) + 1, size=n)
        elif kind == "lognormal" and len(nums) == 2:
            median, p99 = nums
            if not 0 < median <= p99:
                raise ValueError(f"lengths {spec!r}: need 0 < MEDIAN <= P99")
            sigma = (math.log(p99) - math.log(median)) / _Z99
            values = np.rint(rng.lognormal(math.log(median), sigma, size=n)).astype(np.int64)
        else:
            raise ValueError(f"lengths {spec!r}: expected fixed:L, uniform:LO,HI or "
                             f"lognormal:MEDIAN,P99")
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"lengths {spec!r}: no such file (or use fixed:/uniform:/lognormal:)")
        try:
            listed = [int(line) for line in path.read_text().split() if line.strip()]
        except ValueError:
            raise ValueError(f"{path}: every line must be an integer length") from None
        if not listed:
            raise ValueError(f"{path}: no lengths in the file")
        values = np.resize(np.asarray(listed, dtype=np.int64), n)
    hi = max_len if max_len is not None else int(values.max(initial=1))
    return [int(v) for v in np.clip(values, 1, max(1, hi))]
