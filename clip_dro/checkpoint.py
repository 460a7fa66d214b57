"""Checkpoint directories of a run (SPEC 4.6, 6): written by every process in parallel and atomically, found
again for resuming, checked against the dataset they are resumed on, and loaded at any number of processes.

A checkpoint directory holds accelerate's state (model, optimizer, gradient scaler, every process's RNG),
``loss_state/shard-R-of-W.pt`` (process R's shard of the loss's per-sample state, written by R),
``trainer_state.json`` (position in the data, schedule, dataset fingerprint), ``model.pt`` (an open_clip state
dict), ``config.yaml`` and, for runs with per-sample temperatures, ``temperatures/shard-R-of-W.npz`` (arrays
``image_index``, ``image_tau``, ``text_index``, ``text_tau`` of the ids process R owns) plus, while it stays
small (``CSV_MAX_ROWS``), ``temperatures.csv`` with every row (``side,index,tau``).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator

from clip_dro.collectives import sum_over_processes
from clip_dro.config import Config, load_config, save_config
from clip_dro.errors import UserError, first_line
from clip_dro.losses import ContrastiveLoss
from clip_dro.losses.state import StateShard, reshard
from clip_dro.manifest import Manifest

TRAINER_STATE = "trainer_state.json"
LOSS_STATE_DIR = "loss_state"
LEGACY_LOSS_STATE = "loss_state.pt"  # one file, written by rank 0 before the state was sharded
MODEL_FILE = "model.pt"
TEMPERATURES_DIR = "temperatures"
TEMPERATURES_FILE = "temperatures.csv"
CSV_MAX_ROWS = 1_000_000  # ~25 MB of CSV; beyond it only the per-shard .npz files are written
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_FILE = re.compile(r"^shard-(\d+)-of-(\d+)\.(pt|npz)$")


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, or belongs to another dataset or model."""


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
        expected = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            found = set(data) if isinstance(data, dict) else set()
            problem = (f"lacks {', '.join(sorted(expected - found))}" if expected - found
                       else f"has unknown {', '.join(sorted(found - expected))}")
            raise CheckpointError(f"{path} is damaged or from another version: it {problem}")
        return cls(**data)

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
# run started from are in the checkpoint. What to do with a bad sample or a non-finite batch may change too:
# a run stopped by one resumes with data.on_bad_sample=skip (or train.on_nonfinite=skip) to get past it.
RESUMABLE_CHANGES = ("data.train", "data.batch_size", "data.lanes", "data.workers", "data.on_bad_sample",
                     "train.output_dir", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.eval_every", "train.collective_timeout_s", "train.on_nonfinite",
                     "eval.", "model.pretrained", "model.text_tower", "loss.state_device")


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
                              f"{new.get(key)!r}: resuming would not continue the same run; use the same value "
                              "or another train.output_dir")


def check_resumable(directory: Path, config: Config, manifest: Manifest, global_batch: int, lanes: int) -> None:
    """Refuse, before anything is built, a checkpoint that would not continue the run ``config`` describes on
    the data of ``manifest``."""
    state = TrainerState.read(directory)
    state.check_compatible(directory, manifest.dataset_id, manifest.num_images, manifest.num_texts,
                           config.model.name, config.loss.name)
    state.check_same_sequence(directory, global_batch, lanes)
    try:
        saved = load_config(directory / "config.yaml")
    except UserError as exc:
        raise CheckpointError(f"checkpoint {directory}: its config.yaml cannot be used ({exc})") from None
    check_same_settings(directory, saved.to_dict(), config.to_dict())


def step_dirs(run_dir: Path, marker: str = TRAINER_STATE) -> list[Path]:
    """``checkpoints/step-N`` directories of a run that hold ``marker`` (written last: the checkpoint is
    complete), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / marker).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``null`` -> None; ``latest`` -> the newest complete checkpoint of this run: ``final`` once the run has
    finished, else its highest step (None if there is none yet); otherwise the named checkpoint directory,
    which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        if (run_dir / "final" / TRAINER_STATE).is_file():
            return run_dir / "final"
        found = step_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"train.resume: {path} is not a complete checkpoint directory ({TRAINER_STATE} missing)")
    return path


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


def temperature_shards_to_csv(shards: list[Path], path: Path) -> None:
    """``side,index,tau`` rows for every image and text (SPEC 5), sorted by side and index."""
    import pandas as pd

    parts = [np.load(shard) for shard in shards]
    frames = []
    for side in ("image", "text"):
        index = np.concatenate([p[f"{side}_index"] for p in parts])
        tau = np.concatenate([p[f"{side}_tau"] for p in parts])
        order = np.argsort(index, kind="stable")
        frames.append(pd.DataFrame({"side": side, "index": index[order], "tau": tau[order]}))
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


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
                    config: Config, trainer_state: TrainerState) -> Path:
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
        acc.save_state(str(tmp_dir))
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
            save_config(config, tmp_dir / "config.yaml")
            if temperatures is not None and trainer_state.num_images + trainer_state.num_texts <= CSV_MAX_ROWS:
                temperature_shards_to_csv(shard_files(tmp_dir / TEMPERATURES_DIR, "npz"),
                                          tmp_dir / TEMPERATURES_FILE)
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
    return [torch.load(path, map_location="cpu", mmap=True) for path in paths]


def read_loss_state(directory: Path) -> dict:
    """A checkpoint's loss state for every id, as one process holds it, whatever number of processes wrote it
    (for analysis and comparisons; training resumes through :func:`load_checkpoint`)."""
    shards = loss_state_shards(directory)
    sizes = shards[0]["sizes"]
    state = reshard(shards, {"img.": int(sizes[0]), "txt.": int(sizes[1])}, StateShard())
    state["shard_layout"] = torch.tensor([0, 1])
    return state


def load_checkpoint(acc: Accelerator, directory: Path, loss_fn: ContrastiveLoss) -> TrainerState:
    """Restore accelerate's state and this process's shard of the loss state (re-sharded when the checkpoint
    was written by another number of processes); returns the trainer state."""
    state = TrainerState.read(directory)
    try:
        acc.load_state(str(directory))
        loss_fn.load_state_shards(loss_state_shards(directory))
    except UserError:
        raise
    except Exception as exc:  # truncated or damaged files: torch, safetensors and pickle raise many kinds
        raise CheckpointError(f"checkpoint {directory} cannot be loaded ({first_line(exc)}); resume from "
                              "another checkpoint (train.resume=PATH)") from None
    return state


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
