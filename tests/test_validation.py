"""Validation, logged samples and the iteration's extra metrics (verl's names)."""

import json

import pytest

from fusedrl.cli.train import train
from fusedrl.config import ConfigError, load_config

SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
         "generation.max_new_tokens=6", "data.num_prompts=64", "trainer.iterations=2",
         "ppo.actor_lr=0.003", "ppo.critic_lr=0.003"]


def test_validation_samples_and_metrics(tmp_path):
    cfg = load_config(None, SMALL + ["trainer.val_every=2", "trainer.val_before_train=true",
                                     "data.val_size=8", "trainer.log_samples=3"])
    hist = train(cfg, tmp_path, show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [0, 1, 2]
    assert set(lines[0]) == {"iteration", "val/score/mean", "val/score/max", "val/score/min",
                             "val/response_length/mean"}
    assert "val/score/mean" not in lines[1] and 0 <= lines[2]["val/score/mean"] <= 1
    assert hist[-1]["val/score/mean"] == lines[2]["val/score/mean"]
    for m in hist:  # verl's per-call timings, from the per-device events
        for key in ("timing_s/old_log_prob", "timing_s/ref", "timing_s/values",
                    "timing_s/update_actor", "timing_s/update_critic", "actor/lr",
                    "critic/lr", "prompt_length/mean", "critic/vf_explained_var",
                    "perf/cpu_memory_used_gb", "perf/device_utilization"):
            assert key in m, key
        assert 0 < m["timing_s/update_actor"] <= m["timing_s/train"]
        assert 0 < m["perf/device_utilization"] <= 1
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 1, 2, 2, 2]
    assert all(set(s) == {"iteration", "prompt", "response", "score"} for s in samples)


def test_validation_keys_are_checked():
    with pytest.raises(ConfigError, match="trainer.val_every=-1"):
        load_config(None, ["trainer.val_every=-1"])
    with pytest.raises(ConfigError, match="data.val_size=0"):
        load_config(None, ["data.val_size=0"])


def test_validation_per_data_source(tmp_path):
    """data.val_path records with a ``data_source`` key: ``val/<source>/score/mean`` per
    source (verl's val-core/<data_source>/reward/mean@1), whose sample-weighted mean is
    the overall ``val/score/mean``; records without the key count as ``unknown``."""
    from fusedrl.data.builtin import TASKS
    from fusedrl.runtime.launch import make_trainer

    records = TASKS["repeat"].build(9, 123)
    sources = ["a", "b", None] * 3
    with open(tmp_path / "val.jsonl", "w") as f:
        for r, src in zip(records, sources):
            f.write(json.dumps({"prompt": r.prompt, "label": r.label,
                                **({"data_source": src} if src else {})}) + "\n")
    t = make_trainer(load_config(None, SMALL + [f"data.val_path={tmp_path / 'val.jsonl'}"]))
    try:
        assert [r.data_source for r in t.setup.val_prompts] == sources
        v = t.validate()
        scores = [row["score"] for row in t.last_val_samples]
    finally:
        t.close()
    for src in ("a", "b", "unknown"):
        rows = [s for s, x in zip(scores, sources) if (x or "unknown") == src]
        assert v[f"val/{src}/score/mean"] == pytest.approx(sum(rows) / len(rows)), src
    assert v["val/score/mean"] == pytest.approx(sum(scores) / len(scores))
