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

``fusedrl train --plan`` (issue 9): the runtime runs an execution plan.

An :class:`~fusedrl.scheduler.plan.ExecutionPlan` becomes config overrides,
applied *before* the user's ``--set`` overrides (the user's win):

* ``placement.<call>`` for the six calls and ``cluster.devices``
  (:meth:`ExecutionPlan.to_placement_overrides`);
* ``ppo.micro_batch_size`` from the training calls' micro-batch counts: the runtime
  hands whole micro-batches of ``ppo.micro_batch_size`` samples to the dp replicas in
  turn, so a plan's ``micro_batches`` of a training call (per mini-batch per dp rank)
  is ``mini_batch_size / (dp * micro_batches)`` samples; actor and critic training
  must agree on it (one ``ppo.micro_batch_size``);
* ``fusion.interstage`` and ``fusion.interstage_policy`` from
  ``fusion.inter_stage`` / ``fusion.rt_policy``; ``fusion.intrastage`` from
  ``fusion.intra_stage``.

What the runtime cannot execute is a one-line :class:`PlanError` naming the plan
field (and the config key it became): inter-stage fusion needs ``tp=pp=1`` for
generation, for every inference call and for ``actor_train`` (it computes the old
log-probs per streamed micro-batch); fused training needs ``actor_train`` and
``critic_train`` with the same dp/tp/pp, ``pp >= 2`` and every critic stage on the
devices of one actor stage. Inference ``micro_batches`` (forward chunks) have no
runtime setting: the runtime runs inference in ``ppo.micro_batch_size`` micro-batches.

``--plan auto`` searches (:func:`fusedrl.scheduler.plan_search.search`) on
``cluster.devices`` CPU devices with a roofline calibrated on this machine
(:func:`fusedrl.sim.calibration.calibrate_on_cpu`, one core per device) and a cost
that rejects plans the runtime cannot execute (:func:`runtime_problem`); the
search space itself has ``tp=1`` only (a CPU "node" is one core, as docs/design.md's
emulated devices).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import typer

from fusedrl.cli.common import (LENGTHS_HELP, critic_model_option, fail, first_line,
                                json_option, model_option, simulated_models)
from fusedrl.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # imported where used: fusedrl.scheduler loads numpy, and the command
    # group imports this module (`fusedrl --help` should not wait for it)
    from fusedrl.scheduler.plan import ExecutionPlan

RUNTIME_RESTRICTIONS = (
    "tp=1 for every call (one core per emulated device)",
    "inter-stage fusion only with tp=pp=1 for actor_gen, ref, reward, critic_infer and "
    "actor_train",
    "fused training only with actor_train and critic_train on the same devices, same "
    "dp/tp/pp, pp>=2, each critic stage on one actor stage",
    "actor_train and critic_train with the same micro-batch size (one ppo.micro_batch_size)",
)
"""What ``--plan auto`` restricts the search to (printed with the chosen plan)."""

_PENALTY = 1e3
"""Factor on the predicted time of a plan the runtime cannot execute (the search's
annealing still walks through it, but never picks it)."""


# --------------------------------------------------------------------- plan -> config


def train_micro_batch_size(plan: ExecutionPlan, mini_batch_size: int) -> int:
    """``ppo.micro_batch_size`` the plan's training micro-batch counts imply."""
    from fusedrl.scheduler.plan import PlanError

    sizes = {c: plan.micro_batch_size(c, mini_batch_size) for c in ("actor_train",
                                                                     "critic_train")}
    if sizes["actor_train"] != sizes["critic_train"]:
        raise PlanError(
            f"plan field calls.critic_train.micro_batches: the runtime uses one "
            f"ppo.micro_batch_size for both training calls; actor_train's gives "
            f"{sizes['actor_train']} samples per micro-batch, critic_train's "
            f"{sizes['critic_train']} (mini_batch_size={mini_batch_size})")
    return sizes["actor_train"]


def plan_overrides(plan: ExecutionPlan, mini_batch_size: int) -> list[str]:
    """``key=value`` config overrides that make a config run ``plan``."""
    out = [f"{k}={v}" for k, v in plan.to_placement_overrides().items()]
    out.append(f"ppo.micro_batch_size={train_micro_batch_size(plan, mini_batch_size)}")
    f = plan.fusion
    out.append(f"fusion.interstage={'true' if f.inter_stage else 'false'}")
    out.append(f"fusion.interstage_policy={f.rt_policy}")
    out.append(f"fusion.intrastage={'true' if f.intra_stage == 'fused' else 'false'}")
    return out


def runtime_problem(plan: ExecutionPlan, config: Config) -> str | None:
    """Why the runtime cannot execute ``plan`` under ``config`` (None: it can); the
    message names the plan field and the config key it sets."""
    from fusedrl.pipeline.fused_plan import stage_map
    from fusedrl.scheduler.plan import PlanError

    f = plan.fusion
    if f.inter_stage:
        # inference placements are free: freed devices receive one-device copies
        gen = plan.placement("actor_gen")
        if gen.layout.tp != 1 or gen.layout.pp != 1 or gen.layout.dp < 2:
            return (f"plan field fusion.inter_stage=true (config key fusion.interstage): "
                    f"calls.actor_gen.placement is {gen}; the runtime's step-level generation "
                    f"needs >= 2 one-device instances (dp >= 2, tp=1, pp=1)")
    if f.intra_stage == "fused":
        actor, critic = plan.placement("actor_train"), plan.placement("critic_train")
        if actor.layout.pp < 2:
            return (f"plan field fusion.intra_stage=fused (config key fusion.intrastage): "
                    f"calls.actor_train.placement is {actor}; fused training needs pp>=2")
        try:
            stage_map(actor, critic)
        except ValueError as e:
            return f"plan field fusion.intra_stage=fused (config key fusion.intrastage): {e}"
    try:
        train_micro_batch_size(plan, config.ppo.mini_batch_size)
    except PlanError as e:
        return str(e)
    return None


def config_with_plan(plan: ExecutionPlan, config_path: Path | None,
                     user_overrides: Sequence[str] = ()) -> Config:
    """The config of ``config_path`` with ``plan`` applied, then ``user_overrides``.

    Raises :class:`PlanError` (the plan cannot run here) or :class:`ConfigError`."""
    from fusedrl.scheduler.plan import PlanError

    # The micro-batch size depends on ppo.mini_batch_size, which the user may override:
    # read it from the config with the user's overrides first.
    placements = [f"{k}={v}" for k, v in plan.to_placement_overrides().items()]
    base = load_config(config_path, [*placements, *user_overrides])
    problem = runtime_problem(plan, base)
    if problem is not None:
        raise PlanError(problem)
    cfg = load_config(config_path, [*plan_overrides(plan, base.ppo.mini_batch_size),
                                    *user_overrides])
    # The user's overrides may have turned the fusions back on where the plan cannot
    # take them; the runtime would refuse them too, but later (after Ray started).
    if cfg.fusion.interstage and not plan.fusion.inter_stage:
        problem = runtime_problem(plan.with_fusion(replace(plan.fusion, inter_stage=True)), cfg)
        if problem is not None:
            raise ConfigError("config key fusion.interstage=true (--set): "
                              + problem.split(": ", 1)[1])
    return cfg


# --------------------------------------------------------------------- --plan auto


@dataclass
class AutoPlan:
    """What ``--plan auto`` found."""

    plan: ExecutionPlan
    predicted_s: float
    """Predicted iteration seconds of :attr:`plan`."""
    strategies_s: dict[str, float]
    """Predicted seconds of the (runnable, tuned) strategies and the heuristic."""
    strategies: dict[str, ExecutionPlan]
    search_s: float
    calibration: dict[str, Any]


class RunnableCost:
    """The evaluator's cost with plans the runtime cannot execute priced out."""

    def __init__(self, evaluator, config: Config):
        self.ev, self.config = evaluator, config

    def __call__(self, plan: ExecutionPlan):
        s = self.ev.score(plan)
        if runtime_problem(plan, self.config) is not None:
            return replace(s, time_s=s.time_s * _PENALTY)
        return s


def cpu_evaluator(config: Config, *, seed: int = 0, calibrate: bool = True):
    """Plan cost of ``config`` on ``cluster.devices`` CPU devices of this machine:
    peaks measured on one core; efficiency factors fitted by profiling the native
    engine on the config's model (``calibrate``). Returns (evaluator, calibration dict)."""
    from fusedrl.models.config import PRESETS
    from fusedrl.sim.calibration import ProfileSpec, calibrate_on_cpu, measure_cpu_hardware
    from fusedrl.sim.iteration import Workload
    from fusedrl.sim.plan_eval import PlanEvaluator
    from fusedrl.sim.roofline import Efficiency

    if config.model.path:
        raise ConfigError(f"config key model.path={config.model.path!r}: --plan auto needs a "
                          "model preset (model.preset) to build its cost model")
    model = PRESETS[config.model.preset]
    if calibrate:
        spec = ProfileSpec(decode_batches=(1, 8), prompt_len=8, decode_steps=9,
                           prefill_batches=(1, 8), infer_shapes=((1, 32), (8, 32)),
                           train_shapes=((1, 32), (8, 32)), repeats=2, chunk=3)
        report = calibrate_on_cpu(model, spec, threads=1, seed=seed)
        hw, eff, cal = report.hardware, report.after, report.to_dict()
    else:
        hw, eff = measure_cpu_hardware(1), Efficiency()
        cal = {"hardware": hw.name, "efficiency": "defaults (not calibrated)"}
    w = Workload.build(
        batch_size=config.ppo.rollout_batch_size, prompt_len=config.data.max_prompt_len,
        max_new_tokens=config.generation.max_new_tokens,
        mini_batch_size=config.ppo.mini_batch_size, micro_batch_size=config.ppo.micro_batch_size,
        ppo_epochs=config.ppo.ppo_epochs, max_gen_batch=config.generation.max_batch_size,
        lengths=_lengths_spec(config), seed=seed)
    ev = PlanEvaluator(model, model, w, config.cluster.devices, hw, eff, seed=seed)
    return ev, cal


def _lengths_spec(config: Config) -> str | None:
    """The simulator's output-length distribution for ``generation.forced_lengths``
    (the same text form), else None (the simulator's default)."""
    return config.generation.forced_lengths or None


def auto_plan(config: Config, *, time_limit: float = 10.0, seed: int = 0, workers: int = 2,
              calibrate: bool = True) -> AutoPlan:
    """Search the best plan the runtime can execute for ``config``."""
    import time

    from fusedrl.scheduler.plan import PlanError
    from fusedrl.scheduler.plan_search import search

    t0 = time.time()
    ev, cal = cpu_evaluator(config, seed=seed, calibrate=calibrate)
    cost = RunnableCost(ev, config)
    result = search(ev.space(), cost, time_limit=time_limit, seed=seed, workers=workers,
                    explain=lambda p: ev.evaluate(p, timeline=False).memory_error)
    problem = runtime_problem(result.best, config)
    if problem is not None:
        raise PlanError(f"--plan auto found no plan the runtime can execute; the best: {problem}")
    strategies = {n: p for n, (p, s) in result.baselines.items()
                  if s.fits and runtime_problem(p, config) is None}
    return AutoPlan(result.best, result.score.time_s,
                    {n: result.baselines[n][1].time_s for n in strategies}, strategies,
                    time.time() - t0, cal)


# --------------------------------------------------------------------- fusedrl train


def train_config_with_plan(plan_arg: str, config_path: Path, user_overrides: Sequence[str],
                           config: Config, out_dir: Path, *, time_limit: float = 10.0) -> Config:
    """What ``fusedrl train --plan PLAN`` trains with: ``plan_arg`` is a plan file or
    ``auto`` (search for ``config``, print the plan and write ``out_dir/plan.yaml``)."""
    from fusedrl.scheduler.plan import ExecutionPlan

    if plan_arg != "auto":
        return config_with_plan(ExecutionPlan.load(plan_arg), config_path, user_overrides)
    if time_limit < 0:
        raise ValueError(f"--plan-time-limit must be >= 0, got {time_limit}")
    typer.echo(f"--plan auto: calibrating the roofline on this CPU and searching plans on "
               f"{config.cluster.devices} devices ({time_limit:g} s per chain); restricted to "
               f"what the runtime executes:", err=True)
    for r in RUNTIME_RESTRICTIONS:
        typer.echo(f"  - {r}", err=True)
    found = auto_plan(config, time_limit=time_limit, seed=config.trainer.seed)
    typer.echo(f"chosen plan (predicted {found.predicted_s:.3f} s/iteration; search "
               f"{found.search_s:.1f} s):")
    typer.echo(str(found.plan))
    for name, t in found.strategies_s.items():
        typer.echo(f"  {name}: predicted {t:.3f} s/iteration")
    out_dir.mkdir(parents=True, exist_ok=True)
    found.plan.save(out_dir / "plan.yaml", predicted={"iteration_s": round(found.predicted_s, 4)})
    typer.echo(f"wrote {out_dir / 'plan.yaml'}")
    return config_with_plan(found.plan, config_path, user_overrides)


# --------------------------------------------------------------------- fusedrl plan


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
    from fusedrl.sim.iteration import Workload
    from fusedrl.sim.plan_eval import PlanEvaluator
    from fusedrl.sim.roofline import Hardware

    actor, critic = simulated_models(cfg, model, critic_model)
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
    model: Optional[str] = model_option(),
    critic_model: Optional[str] = critic_model_option(),
    lengths: Optional[str] = typer.Option(None, "--lengths", help=LENGTHS_HELP),
    schedule_time: float = typer.Option(0.0, "--schedule-time", help="Search seconds of each "
                                        "fused training schedule (0: greedy starts)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the lengths and the search."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the best plan as YAML "
                                                           "(for fusedrl train --plan)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the predicted timeline of "
                                                             "the best plan (PNG)."),
    json_out: bool = json_option(),
) -> None:
    """Search every call's placement and layout; compare with Xiao et al.'s strategies."""
    from fusedrl.scheduler.plan_search import NoFittingPlan, search

    if time_limit < 0 or workers < 1 or max_steps < 0 or schedule_time < 0:
        fail("--time-limit, --max-steps and --schedule-time must be >= 0, --workers >= 1")
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
        fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        fail(first_line(e))
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
