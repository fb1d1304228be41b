"""`fusedrl train`: end to end on a tiny config, resume equality, bad input."""

import json
import subprocess
import sys

import pytest

from fusedrl.cli.train import train
from fusedrl.config import load_config

SMALL = ["ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=64", "ppo.ppo_epochs=2"]


def read_metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    full = load_config(None, SMALL + ["trainer.iterations=4", "trainer.save_every=2"])
    train(full, tmp_path / "a", show_progress=False)
    a = read_metrics(tmp_path / "a")
    assert [m["iteration"] for m in a] == [1, 2, 3, 4]
    for key in ("critic/score/mean", "actor/pg_loss", "critic/vf_loss", "actor/ppo_kl",
                "response_length/mean", "response_length/max", "timing_s/gen",
                "timing_s/inference", "timing_s/train", "timing_s/step", "perf/throughput"):
        assert key in a[0]
    assert (tmp_path / "a/checkpoints/iter_2/actor/model.safetensors").exists()
    assert (tmp_path / "a/checkpoints/iter_4/trainer_state.pt").exists()

    # Interrupted run: 2 iterations, then a "crash" that left an extra metrics line.
    part = load_config(None, SMALL + ["trainer.iterations=2", "trainer.save_every=2"])
    train(part, tmp_path / "b", show_progress=False)
    with open(tmp_path / "b/metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "stale": True}) + "\n")
    train(full, tmp_path / "b", resume=True, show_progress=False)
    b = read_metrics(tmp_path / "b")
    assert [m["iteration"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a[2:], b[2:]):
        for key in ("critic/score/mean", "actor/pg_loss", "critic/vf_loss", "actor/ppo_kl",
                    "response_length/mean"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-7), key


def test_checkpoint_loads_in_transformers(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    cfg = load_config(None, SMALL + ["trainer.iterations=1"])
    train(cfg, tmp_path / "r", show_progress=False)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "r/checkpoints/iter_1/actor")
    assert hf(torch.tensor([[1, 3, 4]])).logits.shape[-1] == cfg_vocab(tmp_path / "r")


def cfg_vocab(out):
    return json.loads((out / "checkpoints/iter_1/actor/config.json").read_text())["vocab_size"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fusedrl", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--set", "ppo.nope=1"], "unknown config key ppo.nope"),
    (["--set", "ppo.actor_lr=fast"], "ppo.actor_lr: expected a number"),
    (["--config", "missing.yaml"], "missing.yaml does not exist"),
    (["--set", "model.path=/no/such/ckpt"], "/no/such/ckpt"),
    (["--set", "data.task=file", "--set", "data.path=empty.jsonl"], "empty"),
    (["--set", "reward.function=nosuchmod:f"], "nosuchmod"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    r = run_cli("train", "--out", str(out), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    r = run_cli("train", "--out", str(out), "--set", "trainer.iterations=1")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n'
    # --resume where no checkpoint exists yet (a run killed early, or none): iteration 0.
    hist = train(load_config(None, SMALL + ["trainer.iterations=1"]), tmp_path / "fresh",
                 resume=True, show_progress=False)
    assert [m["iteration"] for m in hist] == [1]


def test_default_task_learns_quickly(tmp_path):
    """A short run of the default config: the reward rises (the full run is `make run`)."""
    from fusedrl.cli.common import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, ["trainer.iterations=12"])
    hist = train(cfg, tmp_path / "d", show_progress=False)
    first = sum(m["critic/score/mean"] for m in hist[:3]) / 3
    last = sum(m["critic/score/mean"] for m in hist[-3:]) / 3
    assert last > first + 0.1
