"""Finding and loading a checkpoint for evaluation.

A checkpoint directory holds ``model.pt`` (an open_clip state dict) and ``config.yaml`` (the run config).
A run directory holds ``final/`` once training has finished and ``checkpoints/step-N/`` before that.
"""
from __future__ import annotations

from pathlib import Path

from clip_dro.checkpoint import MODEL_FILE as MODEL_NAME
from clip_dro.checkpoint import CheckpointError, step_dirs
from clip_dro.config import Config, load_config
from clip_dro.errors import UserError
from clip_dro.models import ModelBundle, build_model

CONFIG_NAME = "config.yaml"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: itself if it holds ``model.pt``; for a run directory its
    ``final/`` if present, else its highest ``checkpoints/step-N``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if (path / MODEL_NAME).is_file():
        return path
    if (path / "final").is_dir():
        chosen = path / "final"
    else:
        steps = step_dirs(path, marker=MODEL_NAME)
        if not steps:
            raise CheckpointError(f"checkpoint {path} is neither a checkpoint directory (no {MODEL_NAME}) nor a "
                                  "run directory (no final/ and no checkpoints/step-N/)")
        chosen = steps[-1]
    if not (chosen / MODEL_NAME).is_file():
        raise CheckpointError(f"checkpoint {chosen} has no {MODEL_NAME}")
    return chosen


def load_checkpoint_config(ckpt_dir: Path) -> Config:
    path = ckpt_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {CONFIG_NAME} (the run config it was trained with)")
    return load_config(path)


def load_checkpoint_model(ckpt_dir: str | Path) -> tuple[ModelBundle, Config]:
    """The model of a checkpoint directory, built from its config's architecture with its weights."""
    ckpt_dir = Path(ckpt_dir)
    cfg = load_checkpoint_config(ckpt_dir)
    weights = ckpt_dir / MODEL_NAME
    try:
        bundle = build_model(cfg.model.name, pretrained=str(weights), text_tower=cfg.model.text_tower)
    except UserError:
        raise
    except Exception as exc:
        # The architecture builds without weights, so a failure here is the weights file's: load_state_dict's
        # RuntimeError (missing, unexpected, mis-shaped keys), open_clip's shape asserts, or an unreadable file.
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CheckpointError(f"checkpoint {weights} does not match model {cfg.model.name!r} of its config "
                              f"{ckpt_dir / CONFIG_NAME}: {detail}") from None
    return bundle, cfg
