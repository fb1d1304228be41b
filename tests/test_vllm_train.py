"""`fusedrl train --set generation.backend=vllm` (runs in `make test-vllm`)."""

import json
import os

import pytest

pytest.importorskip("vllm")


def test_train_with_vllm_backend(tmp_path):
    from fusedrl.cli.train import train
    from fusedrl.config import load_config

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's CPU attention needs head_dim >= 32: the "small" preset (the default's
    # "tiny" has head_dim 16).
    cfg = load_config(None, ["generation.backend=vllm", "model.preset=small",
                             "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8",
                             "ppo.micro_batch_size=8", "ppo.actor_lr=1e-3",
                             "data.max_prompt_len=8", "generation.max_new_tokens=8",
                             "trainer.iterations=2"])
    hist = train(cfg, tmp_path / "run", show_progress=False)
    assert [m["iteration"] for m in hist] == [1, 2]
    for m in hist:
        assert m["timing_s/realloc"] > 0
        # vLLM's sampling log-probs agree with the trainer's recomputation, also after a
        # weight update (iteration 2 generates with the trained weights).
        assert m["rollout/logprob_diff_max"] < 1e-3
    assert hist[1]["actor/ppo_kl"] != 0 or hist[1]["actor/pg_loss"] != 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["iteration"] == 2


def test_cli_default_config_with_vllm(tmp_path):
    """The literal ``fusedrl train --set generation.backend=vllm`` on the packaged default
    (tiny preset, head_dim 16, run by vLLM with padded heads), a few iterations."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fusedrl.cli", "train", "--set", "generation.backend=vllm",
         "--set", "trainer.iterations=3", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in hist] == [1, 2, 3]
    assert all(m["rollout/logprob_diff_max"] < 1e-3 for m in hist)
    assert "iter 3/3" in proc.stdout + proc.stderr


def test_resume_generates_from_the_restored_weights(tmp_path):
    """vLLM keeps its own copy of the actor: after --resume it must sample from the
    checkpoint's weights, so the resumed iteration equals the uninterrupted one. Each
    run in its own process (vLLM 0.32 cannot start an engine after numba is loaded)."""
    import subprocess
    import sys

    base = ["--set", "generation.backend=vllm", "--set", "model.preset=small",
            "--set", "ppo.rollout_batch_size=16", "--set", "ppo.mini_batch_size=8",
            "--set", "ppo.micro_batch_size=8", "--set", "ppo.actor_lr=1e-2",
            "--set", "data.max_prompt_len=8", "--set", "generation.max_new_tokens=8",
            "--set", "trainer.save_every=1"]

    def run(out, iterations, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "fusedrl.cli", "train", *base, "--set",
             f"trainer.iterations={iterations}", "--out", str(out), *extra],
            capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full", 2)
    run(tmp_path / "cut", 1)
    resumed = run(tmp_path / "cut", 2, "--resume")
    a, b = full[1], resumed[1]
    assert b["iteration"] == 2
    # the same samples (tokens from the restored policy) and the same update
    for key in ("response_length/mean", "critic/score/mean", "actor/pg_loss",
                "actor/ppo_kl", "critic/vf_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert b["rollout/logprob_diff_max"] < 1e-3
