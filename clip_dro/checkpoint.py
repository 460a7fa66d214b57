"""Checkpoint directories of a run (SPEC 6): written atomically, found again for resuming, and checked against
the dataset they are resumed on.

A checkpoint directory holds accelerate's state (model, optimizer, gradient scaler, every process's RNG),
``loss_state.pt`` (all per-sample state of the loss), ``trainer_state.json`` (position in the data, schedule,
dataset fingerprint), ``model.pt`` (an open_clip state dict), ``config.yaml`` and, for runs with per-sample
temperatures, ``temperatures.csv``.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch

from clip_dro.errors import UserError

TRAINER_STATE = "trainer_state.json"
LOSS_STATE = "loss_state.pt"
MODEL_FILE = "model.pt"
TEMPERATURES_FILE = "temperatures.csv"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
                     "eval.", "model.pretrained", "model.text_tower")


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


def write_temperatures(path: Path, tau_img: torch.Tensor, tau_txt: torch.Tensor) -> None:
    """``side,index,tau`` rows for every image and text (SPEC 5)."""
    import pandas as pd

    frames = [pd.DataFrame({"side": side, "index": range(len(tau)), "tau": tau.detach().float().cpu().numpy()})
              for side, tau in (("image", tau_img), ("text", tau_txt))]
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


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
