"""bench/report.py keeps measured figures apart from predicted/simulated ones."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402


@pytest.mark.parametrize("scenario,key,expected", [
    ("e2e", "speedup_vs_baseline", "measured"),
    ("e2e", "timing_s/step", "measured"),
    ("e2e", "predicted_speedup_vs_baseline", "predicted"),
    ("e2e", "predicted_step_s", "predicted"),
    ("e2e", "predicted_vs_measured", "predicted_vs_measured"),
    ("interstage", "speedup", "measured"),
    ("interstage", "sim_speedup", "predicted"),
    ("fused_train", "ratio_fused_over_sequential", "measured"),
    ("fused_train", "predicted_ratio_fused_over_sequential", "predicted"),
    ("fused_train", "lower_bound_ratio", "predicted"),
    ("schedule", "speedup_vs_1f1b", "predicted"),
    ("plan", "speedup_vs_best_strategy", "predicted"),
    ("sim", "13b/simulated_speedups/all_end_to_end", "predicted"),
    ("sim", "13b/rlhfuse_reported/end_to_end", "published"),
    ("sim_check", "gen/after/ratio_predicted_over_measured", "predicted_vs_measured"),
    ("sim_check", "max_stage_error", "predicted_vs_measured"),
    ("peer", "ratio_fusedrl_over_trl", "measured"),
])
def test_kind(scenario, key, expected):
    assert report.kind(scenario, key) == expected


def test_report_sections_and_plot(tmp_path, monkeypatch):
    (tmp_path / "e2e.json").write_text(json.dumps({"rows": [
        {"variant": "baseline", "samples_per_s": 2.0, "speedup_vs_baseline": 1.0,
         "predicted_step_s": 10.0, "predicted_speedup_vs_baseline": 1.0,
         "predicted_vs_measured": 0.9},
        {"variant": "all", "samples_per_s": 3.0, "speedup_vs_baseline": 1.5,
         "predicted_step_s": 7.0, "predicted_speedup_vs_baseline": 1.43,
         "predicted_vs_measured": 1.1}]}))
    (tmp_path / "schedule.json").write_text(json.dumps({"speedup_vs_1f1b": 1.2}))
    monkeypatch.setattr(sys, "argv", ["report.py", "--results", str(tmp_path)])
    report.main()
    latest = json.loads((tmp_path / "latest.json").read_text())
    e2e = latest["by_kind"]["e2e"]["ratios"]
    assert e2e["measured"] == {"baseline/speedup_vs_baseline": 1.0, "all/speedup_vs_baseline": 1.5}
    assert set(e2e["predicted"]) == {"baseline/predicted_speedup_vs_baseline",
                                     "all/predicted_speedup_vs_baseline"}
    assert set(e2e["predicted_vs_measured"]) == {"baseline/predicted_vs_measured",
                                                 "all/predicted_vs_measured"}
    assert latest["by_kind"]["schedule"]["ratios"]["predicted"] == {"speedup_vs_1f1b": 1.2}
    assert latest["by_kind"]["schedule"]["ratios"]["measured"] == {}
    md = (tmp_path / "latest.md").read_text()
    measured = md.split("### measured")[1].split("###")[0]
    assert "speedup_vs_baseline" in measured and "predicted" not in measured
    assert "### predicted / simulated" in md
    assert (tmp_path / "ratios.png").stat().st_size > 0
