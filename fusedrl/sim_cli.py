"""``fusedrl simulate``: predict one PPO iteration at cluster scale (issue 7).

Reads the experiment config (model preset, batch, mini/micro-batch, PPO epochs,
generation cap and decode slots, prompt length), simulates the iteration on
``--cluster`` GPUs (:mod:`fusedrl.sim.iteration`) for the baseline and each
fusion, and prints a table or (``--json``) one JSON object. ``--model`` takes a
LLaMA size instead of the config's preset (actor and critic alike unless
``--critic-model``). Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

MODEL_ALIASES = {"7b": "llama-7b", "13b": "llama-13b", "33b": "llama-33b", "30b": "llama-33b",
                 "65b": "llama-65b", "70b": "llama2-70b"}


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _model(name: str, option: str):
    from fusedrl.models.config import PRESETS

    key = MODEL_ALIASES.get(name.lower(), name)
    if key not in PRESETS:
        _fail(f"{option} {name!r}: expected one of {', '.join(MODEL_ALIASES)} or a preset "
              f"({', '.join(sorted(PRESETS))})")
    return PRESETS[key]


def _table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"simulated PPO iteration on {result.num_gpus} x {result.hardware.name}",
                  title_justify="left")
    for col in ("variant", "gen layout", "train layout", "gen s", "inference s", "train s",
                "realloc s", "step s", "samples/s", "tokens/s", "speedup"):
        table.add_column(col, justify="left" if "layout" in col or col == "variant" else "right")
    base = result.variants[0].timing_s["step"]
    for v in result.variants:
        t = v.timing_s
        table.add_row(v.variant.name, v.layouts["actor_gen"], v.layouts["actor_train"],
                      f"{t['gen']:.2f}", f"{t['inference']:.2f}", f"{t['train']:.2f}",
                      f"{t['realloc']:.2f}", f"{t['step']:.2f}", f"{v.samples_per_s:.1f}",
                      f"{v.tokens_per_s:,.0f}", f"{base / t['step']:.3f}")
    console = Console(width=max(Console().width, 150))  # the table needs ~140 columns
    console.print(table)
    from fusedrl.sim.iteration import RLHFUSE_REPORTED

    sp = result.speedups()
    lines = [f"{k}: {v:.3f}" for k, v in sp.items()]
    console.print("speedups: " + "; ".join(lines))
    console.print("RLHFuse reported (over its unfused base): " + "; ".join(
        f"{k} {lo}-{hi}" for k, (lo, hi) in RLHFUSE_REPORTED.items()))


def simulate(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML (configs/X.yaml)."),
    cluster: int = typer.Option(0, "--cluster", help="Number of GPUs (default: the config's "
                                                     "cluster.devices)."),
    model: Optional[str] = typer.Option(None, "--model", help="7b|13b|33b|65b|70b or a preset "
                                                              "(default: the config's)."),
    critic_model: Optional[str] = typer.Option(None, "--critic-model",
                                               help="Critic/reward size (default: --model)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Output lengths: fixed:L, "
                                          "uniform:LO,HI, lognormal:MEDIAN,P99 (capped at "
                                          "max_new_tokens; default lognormal, median cap/8, "
                                          "p99 cap)."),
    prompt_len: int = typer.Option(0, "--prompt-len", help="Prompt tokens (default: the "
                                                           "config's data.max_prompt_len)."),
    schedule_time: float = typer.Option(2.0, "--schedule-time",
                                        help="Search seconds per fused pipeline schedule."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled lengths and the search."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Simulate one PPO iteration at cluster scale: baseline vs each fusion."""
    from fusedrl.config import load_config
    from fusedrl.models.config import PRESETS
    from fusedrl.sim.iteration import IterationSimulator, Workload

    try:
        cfg = load_config(config)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    gpus = cluster or cfg.cluster.devices
    if gpus < 1:
        _fail(f"--cluster {cluster}: expected a number of GPUs >= 1")
    if schedule_time < 0:
        _fail(f"--schedule-time {schedule_time}: must be >= 0")
    if model is not None:
        actor = _model(model, "--model")
    elif cfg.model.path:
        _fail(f"{config}: model.path {cfg.model.path!r} has no simulator shape; pass --model")
    else:
        actor = PRESETS[cfg.model.preset]
    critic = _model(critic_model, "--critic-model") if critic_model else actor
    try:
        workload = Workload.build(
            batch_size=cfg.ppo.rollout_batch_size, prompt_len=prompt_len or cfg.data.max_prompt_len,
            max_new_tokens=cfg.generation.max_new_tokens, mini_batch_size=cfg.ppo.mini_batch_size,
            micro_batch_size=cfg.ppo.micro_batch_size, ppo_epochs=cfg.ppo.ppo_epochs,
            max_gen_batch=cfg.generation.max_batch_size, lengths=lengths, seed=seed)
        sim = IterationSimulator(actor, critic, workload, gpus, schedule_time_s=schedule_time,
                                 seed=seed)
        result = sim.run()
    except ValueError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), default=float))
    else:
        _table(result)
