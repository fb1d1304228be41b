"""``fusedrl schedule``: table, JSON, Gantt plot and one-line errors (exit code 2)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from fusedrl.cli.schedule import schedule
from fusedrl.scheduler.pipeline_families import actor_critic_problem

app = typer.Typer()
app.command()(schedule)
runner = CliRunner()


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(actor_critic_problem(4, 2, 8)))
    return path


def test_json_output_follows_the_contract(problem_file):
    res = runner.invoke(app, [str(problem_file), "--json", "--time-limit", "3", "--workers", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"makespan", "lower_bound", "peak_memory", "bubble_ratio", "tasks"} <= set(out)
    assert len(out["tasks"]) == 2 * 4 * 8 + 2 * 2 * 2 * 4
    assert set(out["tasks"][0]) == {"node", "pipeline", "microbatch", "stage", "kind", "start", "end"}
    assert out["lower_bound"] <= out["makespan"] <= out["baseline"]["sequential_1f1b"]["makespan"]
    assert out["memory_lower_bound"] <= out["peak_memory"]


def test_table_and_plot(problem_file, tmp_path):
    png = tmp_path / "gantt.png"
    res = runner.invoke(app, [str(problem_file), "--time-limit", "2", "--workers", "1", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    for text in ("makespan", "lower bound", "bubble ratio", "peak memory", "sequential 1F1B"):
        assert text in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5_000


def test_memory_cap_none_searches_makespan_alone(problem_file):
    res = runner.invoke(app, [str(problem_file), "--json", "--time-limit", "2", "--workers", "1",
                              "--memory-cap", "none"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["search"]["lower_bound_parts"]["memory_cap"] == float("inf")


def test_memory_cap_1f1b_keeps_side_by_side_memory(problem_file):
    res = runner.invoke(app, [str(problem_file), "--json", "--time-limit", "2", "--workers", "1",
                              "--memory-cap", "1f1b"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    sbs = out["baseline"]["side_by_side_1f1b_peak_memory"]
    assert out["search"]["lower_bound_parts"]["memory_cap"] == sbs
    assert out["peak_memory"] <= sbs


def test_default_is_makespan_first(problem_file):
    """No cap by default: never longer than under the 1F1B cap, memory bound reported."""
    runs = {}
    for cap in ("none", "1f1b"):
        res = runner.invoke(app, [str(problem_file), "--json", "--time-limit", "2", "--workers", "1",
                                  "--memory-cap", cap])
        assert res.exit_code == 0, res.output
        runs[cap] = json.loads(res.stdout)
    assert runs["none"]["makespan"] <= runs["1f1b"]["makespan"]
    assert runs["none"]["memory_lower_bound"] <= runs["none"]["peak_memory"]
    assert "bound_gap_reason" in runs["none"]


@pytest.mark.parametrize("content,args,message", [
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 3], "microbatches": 2, "fwd": 1, "bwd": 2}]}, [],
     "stage 1 is mapped to node 3"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 0, "fwd": 1, "bwd": 2}]}, [],
     "microbatches: must be at least 1"),
    ({"nodes": 2, "pipelines": [{"stage_nodes": [0, 1], "microbatches": 2, "fwd": [1, 2, 3], "bwd": 2}]}, [],
     "fwd: expected 2 values"),
    ("{not json", [], "invalid JSON"),
    (actor_critic_problem(4, 1, 4), ["--memory-cap", "0.1"], "no schedule fits"),
    (actor_critic_problem(4, 1, 4), ["--memory-cap", "lots"], "--memory-cap"),
    (actor_critic_problem(4, 1, 4), ["--time-limit", "-1"], "--time-limit"),
    (actor_critic_problem(4, 1, 4), ["--plot", "chart.txt"], "--plot"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, content, args, message):
    path = tmp_path / "p.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    res = runner.invoke(app, [str(path), "--workers", "1", *args])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_missing_file_is_exit_2(tmp_path):
    res = runner.invoke(app, [str(tmp_path / "nope.json")])
    assert res.exit_code == 2
    assert "cannot read problem file" in res.stderr
