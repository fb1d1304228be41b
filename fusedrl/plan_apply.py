"""``fusedrl train --plan``: run an execution plan on the Ray runtime (issue 9).

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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from fusedrl.config import Config, ConfigError, load_config
from fusedrl.scheduler.plan import ExecutionPlan, PlanError

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
    import typer

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
