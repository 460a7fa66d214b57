"""The checkpoint format (design.md §7.2): checkpoint directories written by every process in parallel and
atomically, found again (for resuming and for evaluation), checked against the dataset they are resumed on,
and loaded at any number of processes; and the files of learned temperatures, written and read here.

A checkpoint directory holds accelerate's state (optimizer, gradient scaler, every process's RNG; not the
model's weights, which ``model.pt`` holds once),
``loss_state/shard-R-of-W.pt`` (process R's shard of the loss's per-sample state, written by R),
``trainer_state.json`` (position in the data, schedule, dataset fingerprint), ``trackers.json`` (the tracker
runs a resumed run continues, for runs that report to TensorBoard or W&B), ``model.pt`` (an open_clip state
dict), ``config.yaml`` and, for runs with per-sample temperatures, ``temperatures/shard-R-of-W.npz`` (arrays
``image_index``, ``image_tau``, ``text_index``, ``text_tau`` of the ids process R owns) plus, while it stays
small (``CSV_MAX_ROWS``), ``temperatures.csv`` with every row (``side,index,tau``). A run directory holds
``final/`` once training has finished and ``checkpoints/step-N/`` before that.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import OPTIMIZER_NAME

from clip_dro.config import Config, load_config, save_config
from clip_dro.distributed import sum_over_processes
from clip_dro.errors import UserError, first_line
from clip_dro.losses import ContrastiveLoss
from clip_dro.losses.state import StateShard, reshard
from clip_dro.data.sources import TrainSources, locate
from clip_dro.models import ModelBundle, build_model
from clip_dro.trackers import write_runs

TRAINER_STATE = "trainer_state.json"
LOSS_STATE_DIR = "loss_state"
LEGACY_LOSS_STATE = "loss_state.pt"  # one file, written by rank 0 before the state was sharded
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
TEMPERATURES_DIR = "temperatures"
TEMPERATURES_FILE = "temperatures.csv"
CSV_MAX_ROWS = 1_000_000  # ~25 MB of CSV; beyond it only the per-shard .npz files are written
SIDES = ("image", "text")
TEMPERATURE_COLUMNS = ("side", "index", "tau")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_FILE = re.compile(r"^shard-(\d+)-of-(\d+)\.(pt|npz)$")


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, or belongs to another dataset or model."""


class TemperatureError(UserError):
    """A temperatures file or training set that cannot be analysed; the message names the file or row."""


@dataclass
class TrainerState:
    global_step: int
    epoch: int
    step_in_epoch: int
    dataset_id: str
    num_images: int
    num_texts: int
    model_name: str
    loss_name: str
    scheduler: dict
    # With the seed, these two fix the sample sequence (the data.batch_size of one process does not).
    global_batch: int
    lanes: int
    # Per source of data.train, in order: dataset_id, num_images, num_texts, image_offset, text_offset
    # (TrainSources.layout). Absent in checkpoints from before several sources: one source at offset 0.
    sources: Optional[list[dict[str, Any]]] = None

    def write(self, directory: Path) -> None:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        path = directory / TRAINER_STATE
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a complete checkpoint: {TRAINER_STATE} is missing")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is damaged: {exc}") from None
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(data, dict) or not required <= set(data) <= known:
            found = set(data) if isinstance(data, dict) else set()
            problem = (f"lacks {', '.join(sorted(required - found))}" if required - found
                       else f"has unknown {', '.join(sorted(found - known))}")
            raise CheckpointError(f"{path} is damaged or from another version: it {problem}")
        return cls(**data)

    def recorded_sources(self) -> list[dict[str, Any]]:
        """The sources the checkpoint was trained on (``sources``, or the one source of an older checkpoint)."""
        if self.sources is not None:
            return self.sources
        return [{"dataset_id": self.dataset_id, "num_images": self.num_images, "num_texts": self.num_texts,
                 "image_offset": 0, "text_offset": 0}]

    def check_sources(self, directory: Path, layout: list[dict[str, Any]]) -> None:
        """Refuse sources other than the checkpoint's, in its order: any change moves global indices, so the
        per-sample state would belong to other samples. Single sources keep ``check_compatible``'s message."""
        saved = self.recorded_sources()
        if saved == layout or len(saved) == len(layout) == 1:
            return
        old, new = [s["dataset_id"] for s in saved], [s["dataset_id"] for s in layout]
        if sorted(old) == sorted(new):
            why = "the same sources in another order"
        elif len(new) != len(old):
            why = f"sources {'added' if len(new) > len(old) else 'removed'}"
        else:
            k = next(i for i, (a, b) in enumerate(zip(saved, layout)) if a != b)
            why = f"another data.train[{k}]"
        raise CheckpointError(f"checkpoint {directory} was trained on sources {', '.join(old)} (dataset ids, in "
                              f"order) and data.train gives {', '.join(new)}: {why} would give samples other "
                              "samples' state; list the checkpoint's sources in its order, or use another "
                              "train.output_dir")

    def check_compatible(self, directory: Path, dataset_id: str, num_images: int, num_texts: int,
                         model_name: str, loss_name: str) -> None:
        if (self.dataset_id, self.num_images, self.num_texts) != (dataset_id, num_images, num_texts):
            raise CheckpointError(
                f"checkpoint {directory} was trained on another dataset (id {self.dataset_id}, "
                f"{self.num_images} images, {self.num_texts} texts) than data.train (id {dataset_id}, "
                f"{num_images} images, {num_texts} texts)")
        if self.model_name != model_name:
            raise CheckpointError(f"checkpoint {directory} holds model {self.model_name!r}, config asks for "
                                  f"model.name {model_name!r}")
        if self.loss_name != loss_name:
            raise CheckpointError(f"checkpoint {directory} was trained with loss {self.loss_name!r}, config asks "
                                  f"for loss.name {loss_name!r}")

    def check_same_sequence(self, directory: Path, global_batch: int, lanes: int) -> None:
        """Refuse to resume where the remaining batches would not be those the checkpointed run would see."""
        if self.global_batch != global_batch:
            raise CheckpointError(
                f"checkpoint {directory} was trained with a global batch of {self.global_batch}, this run has "
                f"data.batch_size x processes = {global_batch}: the sample sequence would change")
        if self.lanes != lanes:
            raise CheckpointError(f"checkpoint {directory} was trained with data.lanes = {self.lanes}, this run "
                                  f"has {lanes}: the sample sequence would change")


# Settings a resumed run may change: they do not alter what it computes (where files are, how often to log,
# save and evaluate, what to evaluate, how many workers decode). data.batch_size and data.lanes are compared
# as the global batch and the resolved number of lanes (TrainerState.check_same_sequence); the weights a
# run started from are in the checkpoint (train.init_from's included). Gradient caching (train.accum_steps) changes
# the memory a step takes, not what it computes (up to rounding), so a run that ran out of memory can resume
# with more micro-batches. What to do with a bad sample or a non-finite batch may change too:
# a run stopped by one resumes with data.on_bad_sample=skip (or train.on_nonfinite=skip) to get past it.
RESUMABLE_CHANGES = ("data.train", "data.batch_size", "data.lanes", "data.workers", "data.on_bad_sample",
                     "train.output_dir", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.eval_every", "train.collective_timeout_s", "train.on_nonfinite",
                     "train.accum_steps", "train.init_from", "train.init_optimizer", "eval.", "model.pretrained",
                     "model.text_tower", "loss.state_device", "train.report_to")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_settings(directory: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint (whose resolved config is ``saved``) under settings that would change the
    computation; the message names the first such key."""
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(RESUMABLE_CHANGES) or old.get(key) == new.get(key):
            continue
        raise CheckpointError(f"checkpoint {directory} was written with {key} = {old.get(key)!r}, this run has "
                              f"{new.get(key)!r}: resuming would not continue the same run; use the same value, "
                              f"or start a new run from it with train.init_from={directory} and another "
                              "train.output_dir")


def check_resumable(directory: Path, config: Config, sources: TrainSources, global_batch: int, lanes: int) -> None:
    """Refuse, before anything is built, a checkpoint that would not continue the run ``config`` describes on
    the data of ``sources``."""
    state = TrainerState.read(directory)
    state.check_sources(directory, sources.layout())
    state.check_compatible(directory, sources.dataset_id, sources.num_images, sources.num_texts,
                           config.model.name, config.loss.name)
    state.check_same_sequence(directory, global_batch, lanes)
    try:
        saved = load_config(directory / CONFIG_FILE)
    except UserError as exc:
        raise CheckpointError(f"checkpoint {directory}: its config.yaml cannot be used ({exc})") from None
    check_same_settings(directory, saved.to_dict(), config.to_dict())


def step_dirs(run_dir: Path, needs: str = TRAINER_STATE) -> list[Path]:
    """``checkpoints/step-N`` directories of a run that hold ``needs``, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / needs).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path, needs: str = TRAINER_STATE) -> Optional[Path]:
    """The newest checkpoint of a run: ``final`` once the run has finished, else its highest ``step-N``; None
    if there is none yet. A directory counts when it holds ``needs``, the file its reader reads:
    ``trainer_state.json`` to resume, ``model.pt`` to evaluate. A checkpoint is written under ``NAME.tmp``
    with ``trainer_state.json`` last and only then renamed into place, so among the directories the trainer
    writes both choose the same; ``model.pt`` also admits one assembled by hand (weights and config)."""
    if (run_dir / "final" / needs).is_file():
        return run_dir / "final"
    found = step_dirs(run_dir, needs)
    return found[-1] if found else None


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``null`` -> None; ``latest`` -> this run's :func:`latest_checkpoint` (None if there is none yet);
    otherwise the named checkpoint directory, which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"train.resume: {path} is not a complete checkpoint directory ({TRAINER_STATE} missing)")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names for evaluation: itself if it holds ``model.pt``; for a run
    directory its :func:`latest_checkpoint` that holds ``model.pt`` (``final/`` first)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if (path / MODEL_FILE).is_file():
        return path
    chosen = latest_checkpoint(path, needs=MODEL_FILE)
    if chosen is None:
        raise CheckpointError(f"checkpoint {path} is neither a checkpoint directory (no {MODEL_FILE}) nor a run "
                              "directory (no final/ and no checkpoints/step-N/ with one)")
    return chosen


def shard_name(rank: int, world: int, suffix: str) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.{suffix}"


def shard_files(directory: Path, suffix: str) -> list[Path]:
    """The complete set of ``shard-R-of-W.<suffix>`` files in ``directory``, by rank; a set with a file
    missing (or of two sizes) is a damaged checkpoint."""
    found = {}
    for path in directory.iterdir() if directory.is_dir() else ():
        match = _SHARD_FILE.match(path.name)
        if match and match.group(3) == suffix:
            found[path] = (int(match.group(1)), int(match.group(2)))
    worlds = {world for _, world in found.values()}
    if len(worlds) != 1 or sorted(rank for rank, _ in found.values()) != list(range(next(iter(worlds)))):
        raise CheckpointError(f"{directory} does not hold one complete set of shard-R-of-W.{suffix} files "
                              f"(found {sorted(p.name for p in found) or 'none'})")
    return sorted(found, key=lambda p: found[p][0])


def write_temperature_shard(path: Path, owned: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``image_index``, ``image_tau``, ``text_index``, ``text_tau`` of the ids one process owns."""
    arrays = {}
    for side, (index, tau) in owned.items():
        arrays[f"{side}_index"] = index.cpu().numpy().astype(np.int64)
        arrays[f"{side}_tau"] = tau.detach().float().cpu().numpy()
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def temperature_shards_to_csv(shards: list[Path], path: Path, sources: Optional[list[dict[str, Any]]] = None) -> None:
    """``side,index,tau`` rows for every image and text (design.md §7.4), sorted by side and index. Trained on
    several sources (``sources``: ``TrainerState.sources``), each row also names its ``source`` (its position
    in data.train) and ``source_index`` (its index within that source)."""
    frames = []
    for side in SIDES:
        rows = pd.concat([frame[frame["side"] == side] for frame in map(_temperature_shard, shards)])
        rows = rows.sort_values("index", kind="stable")
        if sources is not None and len(sources) > 1:
            rows["source"], rows["source_index"] = locate(sources, side, rows["index"].to_numpy())
        frames.append(rows)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def read_temperatures(path: str | Path) -> pd.DataFrame:
    """A frame with columns side, index (int) and tau (float), checked: ``path`` is a checkpoint directory (its
    ``temperatures/`` shards, else its ``temperatures.csv``), a directory of ``.npz`` shards, or a CSV file."""
    path = Path(path)
    if path.is_dir() and (path / TEMPERATURES_DIR).is_dir():
        path = path / TEMPERATURES_DIR
    elif path.is_dir() and (path / TEMPERATURES_FILE).is_file():
        path = path / TEMPERATURES_FILE
    if path.is_dir():
        try:
            shards = shard_files(path, "npz")
        except UserError as exc:
            raise TemperatureError(str(exc)) from None
        frame = pd.concat([_temperature_shard(shard) for shard in shards], ignore_index=True)
        return frame.astype({"index": "int64", "tau": "float64"})
    if not path.is_file():
        raise TemperatureError(f"temperatures file {path} does not exist")
    return _temperature_csv(path)


def _temperature_shard(path: Path) -> pd.DataFrame:
    """One ``.npz`` shard's rows, checked, in the dtypes written."""
    try:
        arrays = np.load(path)
        frames = [pd.DataFrame({"side": side, "index": arrays[f"{side}_index"], "tau": arrays[f"{side}_tau"]})
                  for side in SIDES]
    except (OSError, ValueError, KeyError) as exc:
        raise TemperatureError(f"{path}: not a temperatures shard ({first_line(exc)})") from None
    frame = pd.concat(frames, ignore_index=True)
    _check_temperature_rows(frame, lambda row: f"{path} {frame['side'][row]} entry {row}")
    return frame


def _temperature_csv(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = [c for c in TEMPERATURE_COLUMNS if c not in frame.columns]
    if missing:
        raise TemperatureError(f"{path}: missing column {missing[0]!r} (expected columns "
                               f"{','.join(TEMPERATURE_COLUMNS)})")
    # Data row r is line r + 2 of the file (line 1 is the header).
    bad_side = ~frame["side"].isin(SIDES)
    if bad_side.any():
        row = int(bad_side.idxmax())
        raise TemperatureError(f"{path} line {row + 2}: side {frame['side'][row]!r} is not 'image' or 'text'")
    _check_temperature_rows(frame, lambda row: f"{path} line {row + 2}")
    return pd.DataFrame({"side": frame["side"], "index": pd.to_numeric(frame["index"]).astype("int64"),
                         "tau": pd.to_numeric(frame["tau"]).astype("float64")})


def _check_temperature_rows(frame: pd.DataFrame, where: Callable[[int], str]) -> None:
    """Indices non-negative integers, temperatures positive and finite; the first bad row is named with its
    value as written."""
    index, tau = pd.to_numeric(frame["index"], errors="coerce"), pd.to_numeric(frame["tau"], errors="coerce")
    bad_index = index.isna() | (index < 0) | (index % 1 != 0)
    if bad_index.any():
        row = int(bad_index.idxmax())
        raise TemperatureError(f"{where(row)}: index {frame['index'][row]!r} is not a non-negative integer")
    bad_tau = ~((tau > 0) & (tau < math.inf))
    if bad_tau.any():
        row = int(bad_tau.idxmax())
        raise TemperatureError(f"{where(row)}: tau {frame['tau'][row]!r} is not a positive finite number")


def _agree_written(acc: Accelerator, error: Optional[Exception], tmp_dir: Path, final_dir: Path) -> None:
    """Every process learns whether any failed to write its part; if one did, the partial checkpoint goes and
    the previous one stays the latest."""
    (failed,) = sum_over_processes(acc.device, error is not None)
    if failed:
        if acc.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        reason = first_line(error) if error is not None else "another process could not write its part"
        raise CheckpointError(f"cannot write checkpoint {final_dir} ({reason}); the previous checkpoint is "
                              "intact: free space and resume with train.resume=latest")


def save_checkpoint(acc: Accelerator, final_dir: Path, loss_fn: ContrastiveLoss, open_clip_state: Callable[[], dict],
                    config: Config, trainer_state: TrainerState, tracker_runs: Optional[dict] = None) -> Path:
    """Write checkpoint ``final_dir`` under a temporary name, then move it into place, so that an interrupted
    save never looks like a complete checkpoint. Every process writes its own shard of the loss state (and of
    the temperatures, for a loss that has per-sample ones) in parallel; the main process writes what is shared
    and, last, ``trainer_state.json``. A collective: every process must call it."""
    tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
    rank, world = acc.process_index, acc.num_processes
    temperatures = loss_fn.owned_temperatures()
    if acc.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for sub in (LOSS_STATE_DIR, TEMPERATURES_DIR) if temperatures is not None else (LOSS_STATE_DIR,):
            (tmp_dir / sub).mkdir(parents=True)
    acc.wait_for_everyone()
    error: Optional[Exception] = None
    try:
        # model.pt (below) holds the weights in the form open_clip loads; accelerate would write them again.
        skip_weights = acc.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        try:
            acc.save_state(str(tmp_dir))
        finally:
            skip_weights.remove()
        # On the CPU: a multi-process CPU run tags its tensors cpu:0, a location torch.load cannot restore.
        torch.save({k: v.cpu() for k, v in loss_fn.state_dict().items()},
                   tmp_dir / LOSS_STATE_DIR / shard_name(rank, world, "pt"))
        if temperatures is not None:
            write_temperature_shard(tmp_dir / TEMPERATURES_DIR / shard_name(rank, world, "npz"), temperatures)
    except Exception as exc:  # noqa: BLE001  a full disk or a file-size limit surfaces as OSError,
        error = exc           # RuntimeError (torch) or SafetensorError: every process must hear of it
    _agree_written(acc, error, tmp_dir, final_dir)
    if acc.is_main_process:
        try:
            torch.save(open_clip_state(), tmp_dir / MODEL_FILE)
            save_config(config, tmp_dir / CONFIG_FILE)
            if temperatures is not None and trainer_state.num_images + trainer_state.num_texts <= CSV_MAX_ROWS:
                temperature_shards_to_csv(shard_files(tmp_dir / TEMPERATURES_DIR, "npz"),
                                          tmp_dir / TEMPERATURES_FILE, trainer_state.sources)
            if tracker_runs:
                write_runs(tmp_dir, tracker_runs)
            trainer_state.write(tmp_dir)  # last: its presence marks the checkpoint complete
        except Exception as exc:  # noqa: BLE001  as above
            error = exc
    _agree_written(acc, error, tmp_dir, final_dir)
    if acc.is_main_process:
        publish(tmp_dir, final_dir)
    acc.wait_for_everyone()
    return final_dir


def loss_state_shards(directory: Path) -> list[dict]:
    """The loss-state shards of a checkpoint (memory-mapped: a process reads only the ids it will own)."""
    legacy = directory / LEGACY_LOSS_STATE
    paths = [legacy] if legacy.is_file() else shard_files(directory / LOSS_STATE_DIR, "pt")
    return [torch.load(path, map_location="cpu", mmap=True, weights_only=True) for path in paths]


def read_loss_state(directory: Path) -> dict:
    """A checkpoint's loss state for every id, as one process holds it, whatever number of processes wrote it
    (for analysis and comparisons; training resumes through :func:`load_checkpoint`)."""
    shards = loss_state_shards(directory)
    sizes = shards[0]["sizes"]
    state = reshard(shards, {"img.": int(sizes[0]), "txt.": int(sizes[1])}, StateShard())
    state["shard_layout"] = torch.tensor([0, 1])
    return state


def load_checkpoint_config(directory: Path) -> Config:
    """The run config a checkpoint was trained with."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_FILE} (the run config it was trained with)")
    return load_config(path)


def load_checkpoint_model(directory: str | Path) -> tuple[ModelBundle, Config]:
    """The model of a checkpoint directory, built from its config's architecture with its weights."""
    directory = Path(directory)
    cfg = load_checkpoint_config(directory)
    weights = directory / MODEL_FILE
    try:
        bundle = build_model(cfg.model.name, pretrained=str(weights), text_tower=cfg.model.text_tower)
    except UserError:
        raise
    except Exception as exc:
        # The architecture builds without weights, so a failure here is the weights file's: load_state_dict's
        # RuntimeError (missing, unexpected, mis-shaped keys), open_clip's shape asserts, or an unreadable file.
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CheckpointError(f"checkpoint {weights} does not match model {cfg.model.name!r} of its config "
                              f"{directory / CONFIG_FILE}: {detail}") from None
    return bundle, cfg


def load_checkpoint(acc: Accelerator, directory: Path, model: torch.nn.Module,
                    loss_fn: ContrastiveLoss) -> TrainerState:
    """Restore accelerate's state (optimizer, RNGs), the open_clip ``model``'s weights from ``model.pt`` (in
    place: the prepared model holds the same parameters) and this process's shard of the loss state
    (re-sharded when the checkpoint was written by another number of processes); returns the trainer state."""
    state = TrainerState.read(directory)
    skip_weights = acc.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    try:
        acc.load_state(str(directory))
        model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
        loss_fn.load_state_shards(loss_state_shards(directory))
    except UserError:
        raise
    except Exception as exc:  # truncated or damaged files: torch, safetensors and pickle raise many kinds
        raise CheckpointError(f"checkpoint {directory} cannot be loaded ({first_line(exc)}); resume from "
                              "another checkpoint (train.resume=PATH)") from None
    finally:
        skip_weights.remove()
    return state


def resolve_init_from(init_from: Optional[str], run_dir: Path, sources: TrainSources, model_name: str,
                      loss_name: str) -> Optional[Path]:
    """``train.init_from``: None, or a complete checkpoint directory of the same dataset, model and loss,
    outside the new run's directory ``run_dir`` (whose checkpoints and metrics the new run replaces)."""
    if init_from is None:
        return None
    path = Path(init_from)
    if path.resolve().is_relative_to(run_dir.resolve()):
        raise CheckpointError(f"train.init_from: {path} lies in train.output_dir {run_dir}, which the new run "
                              "would overwrite; give the new run another train.output_dir")
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"train.init_from: {path} is not a complete checkpoint directory ({TRAINER_STATE} "
                              "missing)")
    try:
        TrainerState.read(path).check_compatible(path, sources.dataset_id, sources.num_images,
                                                 sources.num_texts, model_name, loss_name)
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    return path


def load_warm_start(directory: Path, model: torch.nn.Module, loss_fn: ContrastiveLoss,
                    optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Start a new run from checkpoint ``directory``: the model's weights (``model.pt``), every per-sample state
    (re-sharded for this run's processes) with the loss's step and epoch counters back at 0 (this run's warm-up
    and γ schedule start afresh), and, given an ``optimizer``, its moments and step counts (the learning rate
    and other hyperparameters stay this run's)."""
    try:
        model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
        shards = [{**shard, "step": torch.zeros_like(shard["step"]), "epoch": torch.zeros_like(shard["epoch"])}
                  for shard in loss_state_shards(directory)]
        loss_fn.load_state_shards(shards)
        if optimizer is not None:
            saved = torch.load(directory / f"{OPTIMIZER_NAME}.bin", map_location="cpu", weights_only=True)
            optimizer.load_state_dict({**optimizer.state_dict(), "state": saved["state"]})
    except UserError:
        raise
    except Exception as exc:  # truncated or damaged files, or weights of another architecture
        raise CheckpointError(f"train.init_from: checkpoint {directory} cannot be loaded ({first_line(exc)})") from None


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written checkpoint into place, replacing an older one of the same name."""
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)


def prune(run_dir: Path, keep: int) -> None:
    """Keep only the newest ``keep`` step checkpoints (0 keeps all)."""
    if keep > 0:
        for old in step_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
