"""Config dataclasses: YAML values, --set overrides, clear errors."""

import pytest

from fusedrl.config import ConfigError, load_config


def test_default_file_loads():
    from fusedrl.cli.common import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.data.task == "repeat" and cfg.model.preset == "tiny"


def test_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  actor_lr: 1.0e-4\n")
    cfg = load_config(f, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                          "ppo.micro_batch_size=2", "trainer.iterations=3",
                          "generation.temperature=1", "ppo.critic_lr=1e-5"])
    assert cfg.ppo.critic_lr == 1e-5
    assert cfg.ppo.actor_lr == 1e-4 and cfg.ppo.rollout_batch_size == 8
    assert isinstance(cfg.generation.temperature, float)


@pytest.mark.parametrize("override, match", [
    (["ppo.actor_lrr=1"], "unknown config key ppo.actor_lrr"),
    (["nosuch.key=1"], "unknown config key nosuch"),
    (["ppo.rollout_batch_size=abc"], "ppo.rollout_batch_size: expected an integer"),
    (["trainer.iterations=0"], "trainer.iterations=0"),
    (["ppo.mini_batch_size=48"], "ppo.mini_batch_size=48: must divide"),
    (["data.task=nope"], "data.task='nope'"),
    (["generation.top_p=2"], "generation.top_p"),
    (["ppo"], "expected key=value"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("override, match", [
    (["ppo.kl_coef=.inf"], "config key ppo.kl_coef=inf: must be a finite number"),
    (["ppo.actor_lr=nan"], "config key ppo.actor_lr='nan': must be a finite number"),
    (["generation.temperature=-.inf"], "generation.temperature=-inf: must be a finite"),
    (["ppo.weight_decay=-1"], "config key ppo.weight_decay=-1.0: must be >= 0"),
    (["trainer.keep_checkpoints=-2"], "trainer.keep_checkpoints=-2: must be >= 0"),
])
def test_non_finite_and_negative_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, override)


def test_non_finite_value_in_a_file_and_a_non_utf8_file(tmp_path):
    f = tmp_path / "inf.yaml"
    f.write_text("ppo:\n  kl_coef: .inf\n")
    with pytest.raises(ConfigError, match="ppo.kl_coef=inf: must be a finite number"):
        load_config(f)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("trainer:\n  out_dir: runs/\xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config file {bad}: not UTF-8 text \\(byte 0xe9"):
        load_config(bad)
    assert load_config(None, ["trainer.keep_checkpoints=3"]).trainer.keep_checkpoints == 3
