"""Where a run's metrics go (``train.report_to``): ``metrics.jsonl``, TensorBoard and Weights & Biases, all
through accelerate's trackers. A resumed run continues its tracker runs: their ids are recorded in every
checkpoint (``trackers.json``) and handed back to the trackers when a run resumes from it.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration

from clip_dro.config import ConfigError
from clip_dro.errors import UserError, first_line

PROJECT = "clip_dro"  # the W&B project and TensorBoard's run name under the logging directory
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RUNS_FILE = "trackers.json"
# The trackers that need a package of their own: name -> the module to import, which is also the extra.
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class JSONLTracker(GeneralTracker):
    """One JSON line per logged record in the run directory's ``metrics.jsonl``, every field as logged (eval
    records keep their dataset name, skip records the skipped samples)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def tracker(self) -> Path:
        return self.path

    def log(self, values: dict, step: Optional[int] = None, record: Optional[dict] = None, **kwargs) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record if record is not None else {"step": step, **values}) + "\n")


def check_installed(report_to: Sequence[str]) -> None:
    """A tracker whose package is missing fails at start-up in one line (accelerate would drop it silently)."""
    for name in report_to:
        if name in EXTRAS:
            try:
                importlib.import_module(EXTRAS[name])
            except ImportError:
                raise ConfigError(f"train.report_to: {name} needs the {EXTRAS[name]} package: "
                                  f"pip install clip-dro[{name}]") from None


def accelerator_arguments(report_to: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """``log_with`` and ``project_config`` for the Accelerator of a run in ``run_dir``."""
    log_with = [JSONLTracker(run_dir / METRICS_FILE) if name == "jsonl" else name for name in report_to]
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR))
    # None for no tracker: an empty list would draw accelerate's "none installed" warning
    return {"log_with": log_with or None, "project_config": project}


def read_runs(checkpoint: Optional[Path]) -> dict[str, str]:
    """The tracker runs a checkpoint recorded; none for a checkpoint written before they were recorded."""
    path = checkpoint / RUNS_FILE if checkpoint is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)}); delete it to start new tracker runs") from None
    if not isinstance(runs, dict) or not all(isinstance(v, str) for v in runs.values()):
        raise UserError(f"{path} is damaged (not a mapping of tracker names to run ids); delete it to start new "
                        "tracker runs")
    return runs


def write_runs(directory: Path, runs: dict[str, str]) -> None:
    (directory / RUNS_FILE).write_text(json.dumps(runs, indent=2) + "\n")


def start(acc: Accelerator, resume_from: Optional[Path], step: int, config: dict) -> dict[str, str]:
    """Start the trackers, continuing the runs of ``resume_from`` (a checkpoint at ``step``); returns the runs to
    record in this run's checkpoints (W&B: the run id; TensorBoard: the log directory)."""
    names = {t.name if isinstance(t, GeneralTracker) else str(t) for t in acc.log_with}
    previous = read_runs(resume_from)
    init_kwargs: dict[str, dict] = {}
    if "wandb" in names:
        wandb = {"name": Path(acc.project_dir).name, "config": config, "resume": "allow"}
        if "WANDB_DIR" not in os.environ:
            wandb["dir"] = acc.project_dir
        if "wandb" in previous:
            wandb["id"] = previous["wandb"]
        init_kwargs["wandb"] = wandb
    if "tensorboard" in names and resume_from is not None:
        # What the stopped run logged after its checkpoint is logged again: TensorBoard hides the older events
        # from this step on, as metrics.jsonl drops those lines.
        init_kwargs["tensorboard"] = {"purge_step": step + 1}
    acc.init_trackers(PROJECT, init_kwargs=init_kwargs)
    runs = {}
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            runs["wandb"] = tracker.run.id
        elif tracker.name == "tensorboard":
            runs["tensorboard"] = tracker.logging_dir
    return runs


def dashboard_scalars(record: dict) -> dict[str, float]:
    """A record's numbers as dashboards plot them: an evaluation's under ``eval/DATASET/``, so that datasets
    evaluated at the same step do not share a curve."""
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    if "eval" in record:
        return {f"eval/{record['dataset']}/{k}": v for k, v in numbers.items()}
    return numbers


def log(acc: Accelerator, record: dict, step: int) -> None:
    """One record to every tracker: metrics.jsonl gets it whole, the dashboards its numbers."""
    acc.log(dashboard_scalars(record), step=step, log_kwargs={"jsonl": {"record": record}})
