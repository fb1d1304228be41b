"""``fusedrl plan``: search the execution plan of a PPO iteration (issue 9).

Reads the experiment config (model preset, batch, mini-batch, PPO epochs,
generation cap, decode slots, prompt length), builds the simulator's plan cost
(:class:`fusedrl.sim.plan_eval.PlanEvaluator`) for ``--cluster`` GPUs, searches
(:func:`fusedrl.scheduler.plan_search.search`: Xiao et al.'s three strategies and
a Megatron-style heuristic, then annealing in two processes) and prints the best
plan, its predicted iteration time and peak memory, and the predicted times of
the strategies and the heuristic. ``--out`` writes the plan as YAML for
``fusedrl train --plan``; ``--plot`` draws its predicted timeline. Bad input is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from fusedrl.sim_cli import _model


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def parse_cluster(text: str) -> tuple[int, int | None]:
    """``N`` (N GPUs, 8 per node) or ``NxG`` (N nodes of G GPUs): (gpus, per node)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"--cluster {text!r}: expected N (GPUs) or NxG (N nodes of G GPUs), "
                         "N, G >= 1")
    if m.group(2) is None:
        return int(m.group(1)), None
    return int(m.group(1)) * int(m.group(2)), int(m.group(2))


def build_evaluator(cfg, gpus: int, per_node: int | None, *, model: str | None = None,
                    critic_model: str | None = None, lengths: str | None = None,
                    schedule_time: float = 0.0, seed: int = 0):
    """The plan cost of ``cfg`` on ``gpus`` devices (ValueError on a bad combination)."""
    from dataclasses import replace

    from fusedrl.models.config import PRESETS
    from fusedrl.sim.iteration import Workload
    from fusedrl.sim.plan_eval import PlanEvaluator
    from fusedrl.sim.roofline import Hardware

    if model is not None:
        actor = _model(model, "--model")
    elif cfg.model.path:
        raise ValueError(f"model.path {cfg.model.path!r} has no simulator shape; pass --model")
    else:
        actor = PRESETS[cfg.model.preset]
    critic = _model(critic_model, "--critic-model") if critic_model else actor
    workload = Workload.build(
        batch_size=cfg.ppo.rollout_batch_size, prompt_len=cfg.data.max_prompt_len,
        max_new_tokens=cfg.generation.max_new_tokens, mini_batch_size=cfg.ppo.mini_batch_size,
        micro_batch_size=cfg.ppo.micro_batch_size, ppo_epochs=cfg.ppo.ppo_epochs,
        max_gen_batch=cfg.generation.max_batch_size, lengths=lengths, seed=seed)
    hw = Hardware()
    hw = replace(hw, gpus_per_node=per_node or min(hw.gpus_per_node, gpus))
    return PlanEvaluator(actor, critic, workload, gpus, hw, schedule_time_s=schedule_time,
                         seed=seed)


def _table(result, estimates) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    best = estimates["searched"]
    console.print(f"[bold]best plan[/bold] (search {result.seconds:.1f} s, "
                  f"{sum(c.steps for c in result.chains)} annealing steps, "
                  f"{sum(c.evaluations for c in result.chains)} plans evaluated)")
    console.print(str(result.best))
    console.print(f"predicted iteration {best.iteration_s:.3f} s "
                  f"(realloc {best.stage_s['realloc']:.2f}, gen {best.stage_s['gen']:.2f}, "
                  f"inference {best.stage_s['inference']:.2f}, train {best.stage_s['train']:.2f}); "
                  f"peak memory {best.peak_memory_bytes / 1e9:.1f} GB of "
                  f"{best.capacity_bytes / 1e9:.1f} GB usable")
    table = Table(title="predicted iteration time", title_justify="left")
    for col in ("plan", "iteration s", "peak GB", "searched speedup", "gen layout",
                "train layout"):
        table.add_column(col, justify="left" if col in ("plan", "gen layout", "train layout")
                         else "right")
    for name, est in estimates.items():
        p = est.plan
        table.add_row(name, f"{est.iteration_s:.3f}" + ("" if est.fits else " (OOM)"),
                      f"{est.peak_memory_bytes / 1e9:.1f}",
                      f"{est.iteration_s / best.iteration_s:.3f}",
                      str(p.placement("actor_gen")), str(p.placement("actor_train")))
    console.print(table)


def plan(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML (configs/X.yaml)."),
    cluster: str = typer.Option("", "--cluster", help="N GPUs (8 per node) or NxG (N nodes of "
                                                      "G GPUs); default the config's "
                                                      "cluster.devices."),
    time_limit: float = typer.Option(10.0, "--time-limit", help="Seconds of each annealing "
                                                               "chain."),
    workers: int = typer.Option(2, "--workers", help="Annealing chains (processes)."),
    max_steps: int = typer.Option(0, "--max-steps", help="Steps per chain (0: until the time "
                                                         "limit); with it the search is "
                                                         "deterministic for a seed."),
    model: Optional[str] = typer.Option(None, "--model", help="7b|13b|33b|65b|70b or a preset "
                                                              "(default: the config's)."),
    critic_model: Optional[str] = typer.Option(None, "--critic-model",
                                               help="Critic/reward size (default: --model)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Output length distribution "
                                          "(as fusedrl simulate)."),
    schedule_time: float = typer.Option(0.0, "--schedule-time", help="Search seconds of each "
                                        "fused training schedule (0: greedy starts)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the lengths and the search."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the best plan as YAML "
                                                           "(for fusedrl train --plan)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the predicted timeline of "
                                                             "the best plan (PNG)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Search every call's placement and layout; compare with Xiao et al.'s strategies."""
    from fusedrl.config import load_config
    from fusedrl.scheduler.plan_search import NoFittingPlan, search

    if time_limit < 0 or workers < 1 or max_steps < 0 or schedule_time < 0:
        _fail("--time-limit, --max-steps and --schedule-time must be >= 0, --workers >= 1")
    try:
        cfg = load_config(config)
        gpus, per_node = parse_cluster(cluster) if cluster else (cfg.cluster.devices, None)
        ev = build_evaluator(cfg, gpus, per_node, model=model, critic_model=critic_model,
                             lengths=lengths, schedule_time=schedule_time, seed=seed)
        space = ev.space()
        result = search(space, ev.score, time_limit=time_limit, seed=seed, workers=workers,
                        max_steps=max_steps or None,
                        explain=lambda p: ev.evaluate(p, timeline=False).memory_error)
    except NoFittingPlan as e:
        _fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    estimates = {"searched": ev.evaluate(result.best)}
    for name, (p, _) in result.baselines.items():
        estimates[name] = ev.evaluate(p, timeline=False)
    best = estimates["searched"]
    if out is not None:
        result.best.save(out, predicted={"iteration_s": round(best.iteration_s, 4),
                                         "peak_memory_gb": round(best.peak_memory_bytes / 1e9, 2)})
    if plot is not None:
        from fusedrl.sim.plan_plot import plot_timeline

        plot_timeline(best, plot, title=f"{result.best.name} plan on {gpus} GPUs: "
                                        f"{best.iteration_s:.2f} s")
    if json_out:
        typer.echo(json.dumps({
            "cluster": {"gpus": gpus, "gpus_per_node": ev.hw.gpus_per_node},
            "best": {"plan": result.best.to_dict(), **best.summary()},
            "baselines": {n: {"plan": e.plan.to_dict(), **e.summary()}
                          for n, e in estimates.items() if n != "searched"},
            "search": {"seconds": result.seconds, "baseline_seconds": result.baseline_seconds,
                       "chains": [{"steps": c.steps, "evaluations": c.evaluations,
                                   "accepted": c.accepted, "seconds": c.seconds,
                                   "time_s": c.score.time_s} for c in result.chains]},
        }, default=float))
    else:
        _table(result, estimates)
