"""The ``fusedrl train`` loop: progress bar, one log line per iteration, metrics.jsonl,
periodic atomic checkpoints and ``--resume``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fusedrl.checkpointing import latest_checkpoint
from fusedrl.config import Config, ConfigError, config_to_yaml


class MetricsWriter:
    """Appends one JSON object per iteration to ``metrics.jsonl`` (flushed and fsynced)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, iteration: int) -> None:
        """Drop lines of iterations past ``iteration`` (written after the checkpoint a run
        resumes from), by an atomic rewrite."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= iteration]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())


def format_log_line(m: dict, total: int) -> str:
    timing = " ".join(f"{k.split('/')[1]} {v:.2f}s" for k, v in m.items()
                      if k.startswith("timing_s/") and k != "timing_s/step")
    return (f"iter {m['iteration']}/{total} | score {m['critic/score/mean']:.3f} | "
            f"kl {m['actor/reward_kl_penalty']:.4f} | pg {m.get('actor/pg_loss', 0):.4f} | "
            f"vf {m.get('critic/vf_loss', 0):.4f} | len {m['response_length/mean']:.1f} | "
            f"{m['perf/throughput']:.0f} tok/s | {timing} | step {m['timing_s/step']:.2f}s")


def prepare_out_dir(out: Path, resume: bool) -> Path | None:
    """Check ``out`` before anything is written; return the checkpoint to resume from."""
    metrics = out / "metrics.jsonl"
    ckpt = latest_checkpoint(out)
    if resume:
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} to resume from")
        return ckpt
    if metrics.exists() or (out / "checkpoints").exists():
        raise ConfigError(f"output directory {out} already holds a run; pass --resume to "
                          f"continue it or choose another --out")
    return None


def train(config: Config, out: Path, resume: bool = False, console: Console | None = None,
          show_progress: bool = True) -> list[dict]:
    """Run ``config`` into ``out``; returns the metrics of the iterations run here."""
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.trainer import build_setup

    console = console or Console(stderr=True, soft_wrap=True)
    ckpt = prepare_out_dir(out, resume)
    torch.manual_seed(config.trainer.seed)
    setup = build_setup(config)  # validates data, models, rewards before writing anything
    trainer = make_trainer(config, setup)  # in-process, or Ray workers per placement
    try:
        return _loop(config, trainer, out, ckpt, console, show_progress)
    finally:
        trainer.close()


def _loop(config: Config, trainer, out: Path, ckpt: Path | None, console: Console,
          show_progress: bool) -> list[dict]:
    writer = MetricsWriter(out / "metrics.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        writer.truncate_after(trainer.iteration)
        console.print(f"resumed from {ckpt} at iteration {trainer.iteration}")
    (out / "config.yaml").write_text(config_to_yaml(config))

    total = config.trainer.iterations
    history = []
    columns = (TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show_progress,
                  transient=False) as progress:
        task = progress.add_task("ppo", total=total, completed=trainer.iteration)
        while trainer.iteration < total:
            metrics = trainer.step()
            writer.write(metrics)
            history.append(metrics)
            progress.console.print(format_log_line(metrics, total))
            progress.update(task, completed=trainer.iteration)
            every = config.trainer.save_every
            if (every and trainer.iteration % every == 0) or trainer.iteration == total:
                trainer.save_checkpoint(out)
    return history
