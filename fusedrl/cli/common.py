"""What the ``fusedrl`` commands share: the one-line error, the embedded default config,
the quiet environment of a run and the model-size names of the simulator commands.

Every command module imports from here and from no other command module except the
one it builds on (``train`` uses ``plan`` for ``--plan``); this module imports no other
module of :mod:`fusedrl.cli` (tests/test_imports.py checks the package's import graph).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NoReturn

import typer

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "default.yaml"
"""The embedded default config (``fusedrl train`` without ``--config``)."""

MODEL_ALIASES = {"7b": "llama-7b", "13b": "llama-13b", "33b": "llama-33b", "30b": "llama-33b",
                 "65b": "llama-65b", "70b": "llama2-70b"}
"""Short model sizes accepted by ``--model`` / ``--critic-model`` of the simulator commands."""


def fail(message: str) -> NoReturn:
    """One-line error on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), for
    :func:`fail`: config and file errors can carry a multi-line explanation."""
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def quiet() -> None:
    """No hub downloads and no third-party banners in a run's output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")


def model_preset(name: str, option: str):
    """The :data:`fusedrl.models.config.PRESETS` entry for ``--model``-style ``name``
    (a size from :data:`MODEL_ALIASES` or a preset name); ValueError names ``option``."""
    from fusedrl.models.config import PRESETS

    key = MODEL_ALIASES.get(name.lower(), name)
    if key not in PRESETS:
        raise ValueError(f"{option} {name!r}: expected one of {', '.join(MODEL_ALIASES)} or a "
                         f"preset ({', '.join(sorted(PRESETS))})")
    return PRESETS[key]


def simulated_models(cfg, model: str | None, critic_model: str | None):
    """(actor, critic) model configs the simulator commands size: ``--model`` (else the
    config's preset) and ``--critic-model`` (else the actor's). A checkpoint path
    (``model.path``) has no simulator shape: ValueError asking for ``--model``."""
    from fusedrl.models.config import PRESETS

    if model is not None:
        actor = model_preset(model, "--model")
    elif cfg.model.path:
        raise ValueError(f"model.path {cfg.model.path!r} has no simulator shape; pass --model")
    else:
        actor = PRESETS[cfg.model.preset]
    return actor, model_preset(critic_model, "--critic-model") if critic_model else actor


# Options of more than one command (typer reads each default once per command, so
# every command gets its own instance).

LENGTHS_HELP = ("Output lengths: fixed:L, uniform:LO,HI, lognormal:MEDIAN,P99 (capped at "
                "max_new_tokens; default lognormal, median cap/8, p99 cap).")


def model_option() -> Any:
    return typer.Option(None, "--model", help="7b|13b|33b|65b|70b or a preset (default: the "
                                              "config's).")


def critic_model_option() -> Any:
    return typer.Option(None, "--critic-model", help="Critic/reward size (default: --model).")


def json_option() -> Any:
    return typer.Option(False, "--json", help="Print one JSON object.")
