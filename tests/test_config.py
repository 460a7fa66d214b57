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


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5e-5", 5e-5), ("3E-4", 3e-4), ("-2e+1", -20.0),
                                         ("2.0e-4", 2e-4), (".5", 0.5), ("7", 7.0)])
def test_floats_as_people_write_them_in_overrides_and_files(tmp_path, text, value):
    cfg = load_config(None, [f"train.lr={abs(value) if value < 0 else text}", f"loss.rho={text}"])
    assert cfg.loss.rho == value and isinstance(cfg.loss.rho, float)
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: 1e-4\nloss:\n  rho: {text}\n  tau_lr: 3E-2\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.loss.rho, cfg.loss.tau_lr) == (1e-4, value, 3e-2)


@pytest.mark.parametrize("text", ["1e-4x", "e-4", "one", "1e", "--1"])
def test_strings_that_are_not_numbers_are_still_refused(text):
    with pytest.raises(ConfigError, match=f"loss.rho: expected a finite number, got '{text}'"):
        load_config(None, [f"loss.rho={text}"])


def test_loss_hyperparameters_are_checked_in_one_place():
    """The config and a loss built in someone else's loop accept and refuse the same values."""
    from clip_dro.errors import UserError
    from clip_dro.losses import ISogCLRLoss

    for key, value in [("tau_momentum", 1.0), ("tau_momentum", 0.0), ("gamma_decay_epochs", 0.5)]:
        load_config(None, [f"loss.{key}={value}"])
        ISogCLRLoss(4, 4, **{key: value})
    for key, value in [("tau_momentum", 1.5), ("gamma_decay_epochs", 0), ("tau_grad_clip", 0), ("gamma", 1.2)]:
        with pytest.raises(ConfigError) as from_config:
            load_config(None, [f"loss.{key}={value}"])
        with pytest.raises(UserError) as from_loss:
            ISogCLRLoss(4, 4, **{key: float(value)})
        assert str(from_config.value) == str(from_loss.value) and f"loss.{key}" in str(from_loss.value)
