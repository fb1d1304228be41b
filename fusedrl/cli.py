"""``fusedrl`` command line (typer). Bad input exits with code 2 and one line on stderr."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fusedrl: fast RLHF (PPO) with inter-/intra-stage fusion and "
                       "parameter reallocation.")

DEFAULT_CONFIG = Path(__file__).parent / "default.yaml"


@app.callback()
def _group() -> None:
    """Keeps ``fusedrl`` a command group even while it has a single sub-command."""


def fail(message: str) -> None:
    """One-line error, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML config (default: the embedded default)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: key=value."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="Join this Ray cluster (the address `ray start --head` "
                                "printed) instead of starting a local one; sets cluster.address."),
    plan: Optional[str] = typer.Option(
        None, "--plan", help="Execution plan: a PLAN.yaml (fusedrl plan --out) or 'auto' (search "
                             "one for this config on cluster.devices CPU devices, write it to "
                             "OUT/plan.yaml); applied before --set."),
    plan_time_limit: float = typer.Option(10.0, "--plan-time-limit",
                                          help="Seconds of each search chain of --plan auto."),
    plugin: List[str] = typer.Option(
        [], "--plugin", help="Import this module (a name, or a path to a .py file) in the "
                             "driver and every worker before the config is checked, so what "
                             "it registers can be named in the config; repeatable, adds to "
                             "the config's plugins list."),
) -> None:
    """Train with PPO; writes OUT/metrics.jsonl and OUT/checkpoints/iter_N/.

    Exit codes: 0 done, 2 bad input or a failed iteration (one line on stderr: a config
    key, a file, a busy --out, a reward function, a non-finite loss), 3 a Ray worker
    died (one line: its device, roles and Ray's cause)."""
    _quiet()
    import torch

    from fusedrl.config import load_config
    from fusedrl.run import WorkerDiedError
    from fusedrl.run import train as run_train

    if threads < 0:
        fail(f"--threads {threads}: must be >= 0 (0: torch's default)")
    if threads:
        torch.set_num_threads(threads)
    try:
        overrides = list(set_) + ([f"cluster.address={cluster}"] if cluster else [])
        cfg = load_config(config if config is not None else DEFAULT_CONFIG, overrides,
                          plugins=plugin)
        out_dir = out if out is not None else Path(cfg.trainer.out_dir)
        if plan is not None:
            import json

            from fusedrl.plan_apply import train_config_with_plan

            overrides.append(f"plugins={json.dumps(cfg.plugins)}")  # --plugin's as well
            cfg = train_config_with_plan(plan, config if config is not None else DEFAULT_CONFIG,
                                         overrides, cfg, out_dir, time_limit=plan_time_limit)
        run_train(cfg, out_dir, resume=resume)
    except WorkerDiedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=3)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


from fusedrl.realloc_cli import realloc  # noqa: E402

app.command("realloc")(realloc)

from fusedrl.schedule_cli import schedule  # noqa: E402

app.command("schedule")(schedule)

from fusedrl.sim_cli import simulate  # noqa: E402

app.command("simulate")(simulate)

from fusedrl.plan_cli import plan  # noqa: E402

app.command("plan")(plan)

from fusedrl.bench_cli import bench  # noqa: E402

app.add_typer(bench, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
