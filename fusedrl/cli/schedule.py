"""``fusedrl schedule``: search a fused actor/critic pipeline schedule (RLHFuse §5).

Reads a problem in the format of docs/design.md "Fused schedule problem", searches for
at most ``--time-limit`` seconds and prints either one JSON object (``--json``:
the result format plus ``baseline`` and ``search`` sections) or a short table of
the fused schedule, the paper's greedy start and sequential 1F1B (makespan and
its ratio to the lower bound, bubble ratio, peak memory). ``--plot FILE.png``
draws the fused schedule as a Gantt chart.

The objective is lexicographic (RLHFuse §5's two phases): the shortest makespan,
then the lowest peak memory at that makespan. ``--memory-cap`` adds a hard per-node
cap on peak memory: a number, or ``1f1b`` for the peak of the pipelines' 1F1B
schedules side by side (fusion never costs memory); ``none`` (default) for no cap. Bad input (unreadable or invalid problem, a cap no
schedule fits) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from fusedrl.cli.common import fail, first_line


def _parse_cap(text: str) -> float | str | None:
    low = text.strip().lower()
    if low in ("none", "inf", "off"):
        return None
    if low == "1f1b":
        return "1f1b"
    try:
        value = float(low)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        fail(f"--memory-cap: expected a positive number, '1f1b' or 'none', got {text!r}")
    return value


def _table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    lb = result.lower_bound
    work, nodes = result.problem.total_work, result.problem.nodes
    rows = [("fused (search)", result.timing), ("greedy start (RLHFuse)", result.greedy),
            ("sequential 1F1B", result.sequential_1f1b)]
    table = Table(title="fused pipeline schedule", title_justify="left")
    for col in ("schedule", "makespan", "/ lower bound", "bubble ratio", "peak memory"):
        table.add_column(col, justify="left" if col == "schedule" else "right")
    for name, t in rows:
        table.add_row(name, f"{t.makespan:g}", f"{t.makespan / lb.value:.3f}",
                      f"{100 * t.bubble_ratio(work, nodes):.1f}%", f"{t.peak_memory:g}")
    console = Console()
    console.print(table)
    cap = "none" if math.isinf(lb.memory_cap) else f"{lb.memory_cap:g}"
    plain = max(lb.node_subsets, lb.critical_path, lb.average_work)
    console.print(f"lower bound {lb.value:g} (memory cap {cap}; without a cap {plain:g}); "
                  f"no schedule this short holds less than {result.memory_lower_bound:g}; "
                  f"1F1B side by side peak memory {result.side_by_side_peak:g}; "
                  f"searched {result.seconds:.1f} s")
    reason = lb.gap_reason()
    if reason:
        console.print(reason)


def schedule(
    problem: Path = typer.Argument(..., help="Problem JSON (nodes, pipelines: stage_nodes, "
                                             "microbatches, fwd, bwd, mem)."),
    time_limit: float = typer.Option(10.0, "--time-limit", help="Search time in seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw a Gantt chart to FILE.png."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same schedule unless the "
                                               "time limit cuts the search)."),
    memory_cap: str = typer.Option("none", "--memory-cap", help="Per-node peak memory cap: a "
                                   "number, 1f1b (1F1B side by side) or none (default: makespan "
                                   "first, then the lowest peak at that makespan)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Search processes (default: 2 "
                                          "where the machine has 2 cores)."),
) -> None:
    """Search a fused micro-batch schedule for pipelines sharing nodes (RLHFuse §5)."""
    from fusedrl.scheduler.pipeline_problem import FusedProblem
    from fusedrl.scheduler.pipeline_schedule import solve

    cap = _parse_cap(memory_cap)
    if not (time_limit >= 0 and math.isfinite(time_limit)):
        fail(f"--time-limit: expected a non-negative number of seconds, got {time_limit}")
    if workers is not None and workers < 1:
        fail(f"--workers: expected at least 1, got {workers}")
    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        fail(f"--plot: expected a .png/.svg/.pdf/.jpg file name, got {str(plot)!r}")
    try:
        prob = FusedProblem.from_json(problem)
        result = solve(prob, time_limit=time_limit, seed=seed, workers=workers, memory_cap=cap)
    except ValueError as exc:
        fail(first_line(exc))
    out = result.to_dict()
    if plot is not None:
        from fusedrl.scheduler.pipeline_plot import plot_gantt

        try:
            plot_gantt(out, plot)
        except OSError as exc:
            fail(f"--plot: cannot write {str(plot)!r} ({exc.strerror})")
    if json_out:
        typer.echo(json.dumps(out))
    else:
        _table(result)
