"""``fusedrl simulate``: predict one PPO iteration at cluster scale (issue 7).

Reads the experiment config (model preset, batch, mini/micro-batch, PPO epochs,
generation cap and decode slots, prompt length), simulates the iteration on
``--cluster`` GPUs (:mod:`fusedrl.sim.iteration`) for the baseline and each
fusion, and prints a table or (``--json``) one JSON object. ``--model`` takes a
LLaMA size instead of the config's preset (actor and critic alike unless
``--critic-model``). Bad input is one line on stderr and exit code 2.

An optional top-level ``simulate:`` section of the config (read here only, so such
a config is for ``fusedrl simulate``) describes what the simulator stands for:

* ``system``: a name of :data:`fusedrl.sim.systems.SYSTEMS` (default ``rlhfuse``);
* ``hardware``: a name of :data:`fusedrl.sim.roofline.HARDWARE` (default ``H100-SXM``);
* ``prompt_len``: real prompt tokens (default ``data.max_prompt_len``);
* ``lengths``: response lengths (as ``--lengths``);
* ``pad_to``: padded sequence length when the system pads to the maximum
  (default ``data.max_prompt_len + generation.max_new_tokens``);
* ``infer_micro_batch_size``: samples per inference forward (default ``ppo.micro_batch_size``);
* ``reference``: a published run to compare with: ``source`` (text), ``stages_s``
  (seconds per stage, verl's timer names), ``tolerance`` (relative, on each stage's
  fraction of generation time). The output then has ``reference_check``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fusedrl.cli.common import (LENGTHS_HELP, critic_model_option, fail, first_line,
                                json_option, model_option, simulated_models)

SIMULATE_KEYS = ("system", "hardware", "prompt_len", "lengths", "pad_to",
                 "infer_micro_batch_size", "reference")


def split_simulate_section(path: Path) -> tuple[dict, list[str] | None]:
    """The config's ``simulate:`` section and, when it has one, the rest of the file
    as ``key=value`` overrides for :func:`fusedrl.config.load_config` (``None``: load
    the file itself)."""
    import yaml

    try:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return {}, None  # load_config reports it
    if not isinstance(tree, dict) or "simulate" not in tree:
        return {}, None
    section = tree.pop("simulate") or {}
    if not isinstance(section, dict):
        fail(f"{path}: simulate must be a mapping, got {section!r}")
    unknown = sorted(set(section) - set(SIMULATE_KEYS))
    if unknown:
        fail(f"{path}: unknown key simulate.{unknown[0]}; known: {', '.join(SIMULATE_KEYS)}")
    overrides: list[str] = []

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else str(k), v)
        else:  # YAML text of the value: load_config parses it back unchanged
            overrides.append(f"{prefix}={yaml.safe_dump(value, default_flow_style=True)}")

    flatten("", tree)
    return section, overrides


def reference_check(stages: dict[str, float], reference: dict) -> dict:
    """Each stage's predicted and published fraction of generation time."""
    published = {k: float(v) for k, v in (reference.get("stages_s") or {}).items()}
    if "gen" not in published or published["gen"] <= 0:
        fail("simulate.reference.stages_s needs gen > 0")
    missing = sorted(set(published) - set(stages))
    if missing:
        fail(f"simulate.reference.stages_s.{missing[0]}: the simulated system has no such "
             f"stage (it has {', '.join(sorted(stages))})")
    tol = float(reference.get("tolerance", 0.25))
    rows = {}
    for k, pub in published.items():
        pred_f, pub_f = stages[k] / stages["gen"], pub / published["gen"]
        rows[k] = {"predicted_s": stages[k], "published_s": pub,
                   "predicted_fraction_of_gen": pred_f, "published_fraction_of_gen": pub_f,
                   "predicted_over_published": pred_f / pub_f,
                   "within_tolerance": abs(pred_f / pub_f - 1) <= tol}
    return {"source": str(reference.get("source", "")), "tolerance": tol, "stages": rows,
            "all_within_tolerance": all(r["within_tolerance"] for r in rows.values())}


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
    base = result.variants[0]
    if base.stages:
        console.print(f"predicted stages of {base.variant.name} (s): " + "; ".join(
            f"{k} {v:.2f}" for k, v in base.stages.items()))


def _reference_table(check: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"predicted vs published stage fractions of gen ({check['source']})",
                  title_justify="left")
    for col in ("stage", "predicted s", "published s", "predicted / gen", "published / gen",
                "ratio", f"within {check['tolerance']:.0%}"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for k, r in check["stages"].items():
        table.add_row(k, f"{r['predicted_s']:.2f}", f"{r['published_s']:.2f}",
                      f"{r['predicted_fraction_of_gen']:.3f}",
                      f"{r['published_fraction_of_gen']:.3f}",
                      f"{r['predicted_over_published']:.2f}",
                      "yes" if r["within_tolerance"] else "NO")
    Console(width=max(Console().width, 120)).print(table)


def simulator_from_config(config: Path, *, cluster: int = 0, model: Optional[str] = None,
                          critic_model: Optional[str] = None, lengths: Optional[str] = None,
                          prompt_len: int = 0, schedule_time: float = 2.0, seed: int = 0,
                          system: Optional[str] = None, hardware: Optional[str] = None):
    """The :class:`~fusedrl.sim.iteration.IterationSimulator` an experiment config (and
    its ``simulate:`` section, overridden by ``system``/``hardware``) describes, with
    its :class:`~fusedrl.sim.systems.SystemProfile` and the section. Bad input: one
    line on stderr, exit code 2."""
    from fusedrl.config import load_config
    from fusedrl.sim.iteration import IterationSimulator, Workload
    from fusedrl.sim.roofline import HARDWARE
    from fusedrl.sim.systems import SYSTEMS

    section, overrides = split_simulate_section(config)
    try:
        cfg = load_config(config) if overrides is None else load_config(None, overrides)
    except (ValueError, FileNotFoundError) as e:
        fail(first_line(e))
    system_name = system or section.get("system", "rlhfuse")
    if system_name not in SYSTEMS:
        fail(f"simulate.system {system_name!r}: expected one of {', '.join(SYSTEMS)}")
    hw_name = hardware or section.get("hardware", "H100-SXM")
    if hw_name not in HARDWARE:
        fail(f"simulate.hardware {hw_name!r}: expected one of {', '.join(HARDWARE)}")
    profile, hw = SYSTEMS[system_name], HARDWARE[hw_name]
    for key in ("prompt_len", "pad_to", "infer_micro_batch_size"):
        v = section.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            fail(f"simulate.{key} {v!r}: expected an integer >= 0")
    gpus = cluster or cfg.cluster.devices
    if gpus < 1:
        fail(f"--cluster {cluster}: expected a number of GPUs >= 1")
    if schedule_time < 0:
        fail(f"--schedule-time {schedule_time}: must be >= 0")
    try:
        actor, critic = simulated_models(cfg, model, critic_model)
    except ValueError as e:
        fail(str(e))
    try:
        workload = Workload.build(
            batch_size=cfg.ppo.rollout_batch_size,
            prompt_len=prompt_len or section.get("prompt_len") or cfg.data.max_prompt_len,
            max_new_tokens=cfg.generation.max_new_tokens, mini_batch_size=cfg.ppo.mini_batch_size,
            micro_batch_size=cfg.ppo.micro_batch_size, ppo_epochs=cfg.ppo.ppo_epochs,
            max_gen_batch=cfg.generation.max_batch_size,
            lengths=lengths or section.get("lengths"), seed=seed, padding=profile.padding,
            pad_to=section.get("pad_to") or cfg.data.max_prompt_len + cfg.generation.max_new_tokens,
            infer_micro_batch_size=section.get("infer_micro_batch_size", 0))
        sim = IterationSimulator(
            actor, critic, workload, gpus, hw, profile.efficiency_for(),
            schedule_time_s=schedule_time, seed=seed, recompute=profile.actor_recompute,
            critic_recompute=profile.critic_recompute, kernels=profile.kernels,
            gen_kernels=profile.gen_kernels, infer_models=profile.infer_models,
            old_log_prob_in_gen=profile.old_log_prob_in_gen,
            overheads=profile.overheads(actor, hw))
    except ValueError as e:
        fail(first_line(e))
    return sim, profile, section


def simulate(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML (configs/X.yaml)."),
    cluster: int = typer.Option(0, "--cluster", help="Number of GPUs (default: the config's "
                                                     "cluster.devices)."),
    model: Optional[str] = model_option(),
    critic_model: Optional[str] = critic_model_option(),
    lengths: Optional[str] = typer.Option(None, "--lengths", help=LENGTHS_HELP),
    prompt_len: int = typer.Option(0, "--prompt-len", help="Prompt tokens (default: the "
                                                           "config's data.max_prompt_len)."),
    schedule_time: float = typer.Option(2.0, "--schedule-time",
                                        help="Search seconds per fused pipeline schedule."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled lengths and the search."),
    system: Optional[str] = typer.Option(None, "--system", help="Software simulated: rlhfuse|"
                                         "verl-2024 (default: simulate.system, else rlhfuse)."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="H100-SXM|A100-SXM4-80GB "
                                           "(default: simulate.hardware, else H100-SXM)."),
    json_out: bool = json_option(),
) -> None:
    """Simulate one PPO iteration at cluster scale: baseline vs each fusion."""
    sim, profile, section = simulator_from_config(
        config, cluster=cluster, model=model, critic_model=critic_model, lengths=lengths,
        prompt_len=prompt_len, schedule_time=schedule_time, seed=seed, system=system,
        hardware=hardware)
    try:
        result = sim.run()
    except ValueError as e:
        fail(first_line(e))
    out = result.to_dict()
    out["system"] = profile.describe()
    check = None
    if section.get("reference"):
        if not isinstance(section["reference"], dict):
            fail(f"simulate.reference {section['reference']!r}: expected a mapping")
        check = reference_check(result.variants[0].stages or {}, section["reference"])
        out["reference_check"] = check
    if json_out:
        typer.echo(json.dumps(out, default=float))
    else:
        _table(result)
        if check:
            _reference_table(check)
