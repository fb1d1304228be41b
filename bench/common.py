"""Shared set-up of the benchmarks that drive the Ray runtime."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager


@contextmanager
def local_ray(num_cpus: int = 4):
    """A private local Ray instance (no dashboard, quiet workers), one torch thread here."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    warnings.filterwarnings("ignore")
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=num_cpus, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-"), log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def emit(result: dict, path: str = "") -> None:
    """Print the result as JSON and write it to ``path`` when given."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
