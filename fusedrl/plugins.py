"""User plug-ins: Python modules imported before a config is checked, so that what they
register is usable by name from ``fusedrl train``: generation backends
(:func:`fusedrl.generation.backend.register_backend`), inter-stage policies
(:func:`fusedrl.scheduler.interstage.register_policy`), reward functions
(:func:`fusedrl.algorithms.rewards.register_reward`) and advantage estimators
(:func:`fusedrl.algorithms.advantages.register_adv_estimator`).

A plug-in is named by a module name (installed, on ``PYTHONPATH`` or in the current
directory, as ``python -m`` finds it) or by a path to a ``.py`` file. Both
``fusedrl train --plugin X`` (repeatable) and the config's top-level ``plugins:`` list
name them. Registries are per process: the driver imports the plug-ins in
:func:`fusedrl.config.load_config`, before the sections are built and checked, and
every Ray worker imports them again at the start of its setup
(:meth:`fusedrl.runtime.worker.Worker.setup`). File paths are made absolute when the
config is loaded, so workers started in another directory find them; on a multi-node
cluster they must be on storage every node reaches (as ``--out``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

__all__ = ["is_file_plugin", "normalize", "load_plugin", "load_plugins"]


def is_file_plugin(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def normalize(spec: str) -> str:
    """A file plug-in as an absolute path (resolved against the current directory); a
    module name as it is. A :class:`~fusedrl.config.ConfigError` for anything else."""
    from fusedrl.config import ConfigError

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"config key plugins: {spec!r} is not a module name or a .py file")
    spec = spec.strip()
    if is_file_plugin(spec):
        return str(Path(spec).expanduser().resolve())
    if not all(part.isidentifier() for part in spec.split(".")):
        raise ConfigError(f"config key plugins: {spec!r} is not a module name or a .py file")
    return spec


def _module_name(path: Path) -> str:
    # One stable name per file: importing it again (another load_config, a worker that
    # also got it from the driver's config) finds it in sys.modules and does nothing.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"fusedrl_plugin_{path.stem}_{digest}"


def load_plugin(spec: str) -> ModuleType:
    """Import one plug-in (once per process); a one-line
    :class:`~fusedrl.config.ConfigError` naming it when that fails."""
    from fusedrl.config import ConfigError

    spec = normalize(spec)
    if is_file_plugin(spec):
        path = Path(spec)
        name = _module_name(path)
        if name in sys.modules:
            return sys.modules[name]
        if not path.is_file():
            raise ConfigError(f"config key plugins: file {spec} does not exist")
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        # In sys.modules before it runs: its dataclasses and pickling look it up there.
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"config key plugins: importing {spec} failed: "
                              f"{type(e).__name__}: {e}") from e
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # As `python -m` does (the console script's sys.path lacks it); it stays, so the
        # plug-in's own imports of its neighbours work, and Ray workers started after this
        # get the driver's sys.path.
        sys.path.append(cwd)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name is not None and (spec + ".").startswith(e.name + "."):
            raise ConfigError(f"config key plugins: no module named {spec!r} (not installed, "
                              f"not on PYTHONPATH, not in {cwd})") from None
        raise ConfigError(f"config key plugins: importing {spec!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    except Exception as e:
        raise ConfigError(f"config key plugins: importing {spec!r} failed: "
                          f"{type(e).__name__}: {e}") from e


def load_plugins(specs: Iterable[str]) -> list[ModuleType]:
    """Import every plug-in of ``specs``, in order."""
    return [load_plugin(s) for s in specs]
