import pytest
import yaml

from clip_dro.config import Config, ConfigError, load_config, save_config
from clip_dro.resources import CONFIGS_DIR


def test_tiny_cpu_config_loads_and_overrides_apply():
    cfg = load_config(CONFIGS_DIR / "tiny_cpu.yaml", ["train.max_steps=20", "eval.retrieval=[a, b]",
                                                      "eval.zeroshot=[]", "train.resume=null", "loss.rho=2"])
    assert cfg.train.max_steps == 20
    assert cfg.eval.retrieval == ["a", "b"] and cfg.eval.zeroshot == []
    assert cfg.train.resume is None
    assert cfg.loss.rho == 2.0 and isinstance(cfg.loss.rho, float)
    assert cfg.model.name == "tiny-vit"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_shipped_config_is_valid(name):
    assert isinstance(load_config(CONFIGS_DIR / name), Config)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown config key train.max_stepz"),
    ("modle.name=x", "unknown config key modle"),
    ("data.batch_size=abc", "data.batch_size: expected an integer, got 'abc'"),
    ("data.batch_size=1", "data.batch_size: 1 must be at least 2"),
    ("loss.name=simclr", "loss.name: 'simclr' is not one of"),
    ("loss.tau_init=2.0", "loss.tau_init: 2.0 must lie in"),
    ("loss.gamma=0", "loss.gamma: 0.0 must be in (0, 1]"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("train.lr=.nan", "train.lr: expected a finite number"),
    ("train.max_steps", "is not of the form key=value"),
    ("train=3", "train: expected a mapping"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_file_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": {"taumin": 0.1}}))
    with pytest.raises(ConfigError, match="unknown config key loss.taumin"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS_DIR / "tiny_cpu.yaml", ["loss.name=clip", "train.grad_clip_norm=1.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
