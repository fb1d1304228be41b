"""Experiment tracking: one :class:`Tracker` fans each iteration's metrics out to the sinks
named in ``trainer.logger`` (as verl's ``trainer.logger``)::

    console      one line per iteration on stdout, cut to the terminal's width
    jsonl        OUT/metrics.jsonl, one JSON object per iteration (flushed and fsynced)
    tensorboard  TensorBoard event files in OUT/tensorboard (torch.utils.tensorboard),
                 every numeric metric a scalar at the iteration as its step
    wandb        Weights & Biases, offline by default (OUT/wandb; ``wandb sync`` uploads
                 it later); ``WANDB_MODE=online`` logs live. Needs ``pip install wandb``.

A resumed run passes ``resume_step``: TensorBoard then drops the events a killed run
wrote at or past that step (``purge_step``), and W&B continues the same run id.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["LOGGERS", "Tracker", "check_loggers", "console_line"]

LOGGERS = ("console", "jsonl", "tensorboard", "wandb")
"""Sink names of ``trainer.logger``."""

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(loggers: str | Iterable[str]) -> list[str]:
    """The sink names as a list (a single name may be given as a string); a one-line
    ``ValueError`` naming ``trainer.logger`` for an unknown name or a sink whose package
    is not installed."""
    names = [loggers] if isinstance(loggers, str) else list(loggers)
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"trainer.logger: unknown sink {name!r}; known: {', '.join(LOGGERS)}")
        pkg = _PACKAGE.get(name)
        if pkg is not None:
            try:
                __import__(pkg)
            except ImportError:
                raise ValueError(f"trainer.logger: sink {name!r} needs the {pkg} package "
                                 f"(pip install {pkg})") from None
    return list(dict.fromkeys(names))  # each sink once, in the given order


# ----------------------------------------------------------------------------- console

# (metric, label) in the order shown; the line keeps what fits the terminal.
CONSOLE_KEYS = (
    ("critic/score/mean", "score"),
    ("val/score/mean", "val"),
    ("actor/reward_kl_penalty", "kl"),
    ("actor/kl_loss", "kl_loss"),
    ("actor/pg_loss", "pg"),
    ("critic/vf_loss", "vf"),
    ("response_length/mean", "len"),
    ("perf/throughput", "tok/s"),
    ("timing_s/step", "step_s"),
)


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def console_line(metrics: Mapping, step: int, total: int | None = None,
                 width: int | None = None) -> str:
    """``iter 3/10 | score 0.237 | kl 0.0012 | ...``: the :data:`CONSOLE_KEYS` present in
    ``metrics``, cut at a field boundary to ``width`` columns (the terminal's by default)."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    fields = [f"iter {step}" + (f"/{total}" if total else "")]
    fields += [f"{label} {_fmt(metrics[k])}" for k, label in CONSOLE_KEYS if k in metrics]
    line = fields[0]
    for f in fields[1:]:
        if len(line) + 3 + len(f) > width:
            break
        line += " | " + f
    return line[:width]


# ----------------------------------------------------------------------------- sinks


class _Console:
    def __init__(self, total: int | None):
        self.total = total

    def log(self, metrics: Mapping, step: int) -> None:
        # sys.stdout looked up per call: a live progress bar may have redirected it.
        print(console_line(metrics, step, self.total), file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class _Jsonl:
    """Appends ``json.dumps(metrics)`` per line, as the run loop's ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, metrics: Mapping, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(metrics)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        pass


def _scalars(metrics: Mapping):
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield k, float(v)


class _TensorBoard:
    def __init__(self, log_dir: Path, resume_step: int | None, config_text: str | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard discards events of an earlier (killed) run at steps >=
        # this one, so a resumed run's curve has no doubled segment.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
        if config_text and resume_step is None:
            self.writer.add_text("config", "```\n" + config_text + "\n```", 0)

    def log(self, metrics: Mapping, step: int) -> None:
        for k, v in _scalars(metrics):
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()  # readers see each iteration (default: every 120 s)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, project: str, experiment: str | None, config: dict | None,
                 resume: bool):
        import wandb

        # One run id per output directory, kept across --resume.
        id_file = out / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if resume and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=experiment, config=config, id=run_id,
                              dir=str(out), resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, metrics: Mapping, step: int) -> None:
        self.run.log(dict(_scalars(metrics)), step=step)

    def close(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------- tracker


class Tracker:
    """Metrics of each iteration to every sink of ``loggers``.

    Args:
        loggers: sink names (:data:`LOGGERS`), checked by :func:`check_loggers`.
        out_dir: the run's output directory.
        project, experiment: W&B project and run name (verl's ``trainer.project_name`` /
            ``experiment_name``).
        config: the run's configuration as a dict (W&B run config, TensorBoard text).
        total_steps: shown in the console line (``iter 3/10``).
        resume_step: the first step this process logs when it resumes a run.
    """

    def __init__(self, loggers: str | Iterable[str], out_dir: str | Path, *,
                 project: str = "fusedrl", experiment: str | None = None,
                 config: dict | None = None, total_steps: int | None = None,
                 resume_step: int | None = None):
        names = check_loggers(loggers)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.sinks: dict[str, object] = {}
        try:
            for name in names:
                if name == "console":
                    self.sinks[name] = _Console(total_steps)
                elif name == "jsonl":
                    self.sinks[name] = _Jsonl(out / "metrics.jsonl")
                elif name == "tensorboard":
                    text = json.dumps(config, indent=1, default=str) if config else None
                    self.sinks[name] = _TensorBoard(out / "tensorboard", resume_step, text)
                elif name == "wandb":
                    self.sinks[name] = _Wandb(out, project, experiment or out.name, config,
                                              resume_step is not None)
        except BaseException:
            self.close()
            raise

    def log(self, metrics: Mapping, step: int) -> None:
        """Write one iteration's ``metrics`` (name -> number; other values reach only the
        console and jsonl sinks) at ``step``."""
        for sink in self.sinks.values():
            sink.log(metrics, int(step))

    def close(self) -> None:
        """Flush and close every sink (the W&B run is finished). Idempotent."""
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
