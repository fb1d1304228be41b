"""Plug-ins from the CLI (``fusedrl train --plugin``, the config's ``plugins:``): imported
in the driver before the config is checked and in every Ray worker before it builds
anything, so registered backends, policies, rewards and advantage estimators are usable
by name. Each example of ``examples/`` runs through the CLI on 2 devices."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusedrl.cli.main import app
from fusedrl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SMALL = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=32", "ppo.ppo_epochs=1",
         "trainer.iterations=2", "model.preset=tiny"]
DP2 = ["cluster.devices=2", "placement.default=dp2tp1pp1@0-1"]


def train(tmp_path, plugins, overrides):
    """``fusedrl train`` in this process (Ray: the session's instance, joined by the
    driver; the workers are new processes): exit code, output, metrics lines."""
    args = ["train", "--out", str(tmp_path / "run")]
    for p in plugins:
        args += ["--plugin", str(p)]
    for o in overrides:
        args += ["--set", o]
    r = CliRunner().invoke(app, args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = ([json.loads(line) for line in metrics.read_text().splitlines()]
             if metrics.exists() else [])
    return r.exit_code, r.output, lines


# ------------------------------------------------------------------ loading


@pytest.mark.slow  # a fresh interpreter loading six configs (~10-25 s)
def test_names_are_unknown_without_the_plugins():
    """In a fresh process (registries are per process): each example's name is refused
    by the config check, one line naming the key, until the plug-in is given."""
    code = textwrap.dedent(f"""
        from fusedrl.config import ConfigError, load_config
        cases = [("fusion.interstage_policy=tenth", "tenth_policy.py"),
                 ("generation.backend=counting", "counting_backend.py"),
                 ("algorithm.adv_estimator=group_median", "median_advantage.py")]
        for override, plugin in cases:
            try:
                load_config(None, [override])
                print("accepted", override)
            except ConfigError as e:
                print("refused", str(e).splitlines()[0])
            cfg = load_config(None, [override], plugins=[{str(EXAMPLES)!r} + "/" + plugin])
            print("with plugin", cfg.plugins)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    refused = [line for line in out if line.startswith("refused")]
    assert len(refused) == 3, out
    assert "fusion.interstage_policy='tenth'" in refused[0]
    assert "generation.backend='counting'" in refused[1]
    assert "algorithm.adv_estimator" in refused[2] and "group_median" in refused[2]
    assert not any(line.startswith("accepted") for line in out), out
    assert len([line for line in out if line.startswith("with plugin")]) == 3


def test_plugins_list_in_the_config_and_from_the_cli_are_merged(tmp_path, monkeypatch):
    (tmp_path / "plug_a.py").write_text("LOADED = True\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "plug_b.py").write_text("LOADED = True\n")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("plugins: [plug_a, sub/plug_b.py]\n")
    monkeypatch.chdir(tmp_path)  # module names are found in the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cfg = load_config(cfg_file, plugins=["plug_a", str(sub / "plug_b.py"), "json"])
    # file paths absolute (workers may start elsewhere), duplicates once, order kept
    assert cfg.plugins == ["plug_a", str(sub / "plug_b.py"), "json"]
    assert sys.modules["plug_a"].LOADED
    # a single name is a one-element list; the list reaches config.yaml
    assert load_config(None, ["plugins=json"]).plugins == ["json"]
    assert load_config(None).plugins == []


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module_xyz", "config key plugins: no module named 'no_such_module_xyz'"),
    ("missing/file.py", "config key plugins: file "),
    ("not a module", "config key plugins: 'not a module' is not a module name"),
])
def test_bad_plugin_is_one_line_naming_the_key(tmp_path, spec, needle):
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "o"), "--plugin", spec])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_plugin_that_raises_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('broken plug-in')\n")
    with pytest.raises(ConfigError, match=r"importing .*bad.py failed: RuntimeError: broken"):
        load_config(None, plugins=[str(bad)])
    with pytest.raises(ConfigError, match="config key plugins: expected a list"):
        load_config(None, ["plugins={a: 1}"])


# ------------------------------------------------------ examples through the CLI


@pytest.mark.ray
@pytest.mark.slow
def test_example_policy_sets_the_migration_threshold(tmp_path, ray_session):
    code, output, metrics = train(tmp_path, [EXAMPLES / "tenth_policy.py"],
                                  SMALL + DP2 + ["fusion.interstage=true",
                                                 "fusion.interstage_policy=tenth",
                                                 "ppo.rollout_batch_size=20"])
    assert code == 0, output
    assert len(metrics) == 2
    # the policy's Rt (samples still generating when the tail migrates): a tenth of 20
    # (the built-in fixed policy: 4; rlhfuse before its first observation: 4)
    assert [m["interstage/rt"] for m in metrics] == [2, 2]
    # the Ray runtime's checkpoint is inference-ready too (workers wrote the weights)
    ckpt = tmp_path / "run" / "checkpoints" / "iter_2"
    assert json.loads((ckpt / "actor" / "generation_config.json").read_text())["eos_token_id"]
    critic = json.loads((ckpt / "critic" / "config.json").read_text())
    assert critic["architectures"] == ["LlamaForSequenceClassification"]
    assert "pad_token_id" in critic and (ckpt / "critic" / "tokenizer.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_example_backend_runs_in_the_workers(tmp_path, ray_session):
    # Generation runs on the two workers only (actor_gen apart from the driver): a worker
    # without the plug-in fails with "unknown generation backend 'counting'".
    code, output, metrics = train(tmp_path, [EXAMPLES / "counting_backend.py"],
                                  SMALL + DP2 + ["generation.backend=counting"])
    assert code == 0, output
    assert len(metrics) == 2 and all(m["response_length/mean"] > 0 for m in metrics)


@pytest.mark.ray
@pytest.mark.slow
def test_example_reward_scores_the_samples(tmp_path, ray_session):
    code, output, metrics = train(tmp_path, [EXAMPLES / "brevity_reward.py"],
                                  SMALL + DP2 + ["reward.function=brevity"])
    assert code == 0, output
    for m in metrics:  # 1 / (1 + characters): in (0, 1], 1 only for empty responses
        assert 0 < m["critic/score/mean"] <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_example_advantage_estimator_trains_without_a_critic(tmp_path, ray_session):
    code, output, metrics = train(tmp_path, [EXAMPLES / "median_advantage.py"],
                                  SMALL + DP2 + ["algorithm.adv_estimator=group_median",
                                                 "actor.rollout_n=2"])
    assert code == 0, output
    assert len(metrics) == 2
    for m in metrics:  # the iteration used it: no critic, returns are the advantages
        assert "critic/vf_loss" not in m and "critic/values/mean" not in m
        assert m["critic/returns/mean"] == pytest.approx(m["critic/advantages/mean"])
    assert not (tmp_path / "run" / "checkpoints" / "iter_2" / "critic").exists()
    # What the example computes: score minus its group's median, on every response token.
    import torch

    from fusedrl.algorithms import get_adv_estimator

    fn = get_adv_estimator("group_median")
    assert not fn.needs_critic
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0],
                            [0.0, 5.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    adv, ret = fn(rewards, mask, ["a", "a", "a", "b", "b"])
    # group a scores 1, 3, 2 (median 2); group b 5, 1 (torch's median of two: the lower)
    expect = torch.tensor([-1.0, 1.0, 0.0, 4.0, 0.0])[:, None] * mask
    assert torch.equal(adv, expect) and torch.equal(ret, expect)
