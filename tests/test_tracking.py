"""Experiment tracking sinks, read back with each tool's own reader (TensorBoard's
EventAccumulator; W&B's offline run file)."""

import json
import math

import pytest

from fusedrl.tracking import LOGGERS, Tracker, check_loggers, console_line


def metrics(i):
    return {"iteration": i, "critic/score/mean": 0.1 * i, "actor/pg_loss": -0.01 * i,
            "response_length/mean": 10.0 + i, "timing_s/step": 1.5, "note": "text"}


def test_check_loggers():
    assert check_loggers("console") == ["console"]
    assert check_loggers(["jsonl", "console", "jsonl"]) == ["jsonl", "console"]
    with pytest.raises(ValueError, match="trainer.logger: unknown sink 'mlflow'"):
        check_loggers(["console", "mlflow"])
    assert set(LOGGERS) == {"console", "jsonl", "tensorboard", "wandb"}


def test_missing_package_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match=r"sink 'wandb' needs the wandb package \(pip install"):
        check_loggers(["wandb"])


def test_console_line_fits_the_terminal(tmp_path, capsys, monkeypatch):
    m = metrics(3)
    line = console_line(m, 3, 10, width=200)
    assert line == ("iter 3/10 | score 0.3 | pg -0.03 | len 13 | step_s 1.5")
    short = console_line(m, 3, 10, width=30)
    assert short == "iter 3/10 | score 0.3"  # cut at a field: " | pg -0.03" would pass 30
    assert console_line({"critic/score/mean": math.nan}, 1).endswith("score nan")
    monkeypatch.setenv("COLUMNS", "40")
    with Tracker(["console"], tmp_path) as t:
        t.log(m, 3)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and len(out.rstrip("\n")) <= 40 and out.startswith("iter 3 |")


def test_jsonl_sink(tmp_path):
    with Tracker(["jsonl"], tmp_path) as t:
        for i in (1, 2):
            t.log(metrics(i), i)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [metrics(1), metrics(2)]


def _scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)], acc.Tags()


def test_tensorboard_events_read_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    with Tracker(["tensorboard"], tmp_path, config={"algorithm": {"adv_estimator": "grpo"}}) as t:
        for i in (1, 2, 3):
            t.log(metrics(i), i)
    points, tags = _scalars(tmp_path / "tensorboard", "critic/score/mean")
    assert points == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert "actor/pg_loss" in tags["scalars"] and "note" not in tags["scalars"]
    assert "iteration" in tags["scalars"]

    # A resumed run (from the checkpoint of step 1) rewrites steps 2 and 3: TensorBoard
    # drops the killed run's events at those steps.
    with Tracker(["tensorboard"], tmp_path, resume_step=2) as t:
        for i in (2, 3):
            t.log({"critic/score/mean": 1.0 + i}, i)
    points, _ = _scalars(tmp_path / "tensorboard", "critic/score/mean")
    assert points == [(1, 0.1), (2, 3.0), (3, 4.0)]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Tracker(["wandb"], tmp_path, project="fusedrl-test", config={"seed": 1}) as t:
        for i in (1, 2):
            t.log(metrics(i), i)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))
    data = run_file.read_bytes()
    assert b"critic/score/mean" in data and b"response_length/mean" in data
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    assert run_id in run_file.name
