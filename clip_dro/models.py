"""Model factory: open_clip architectures by name, the small CPU ones registered from ``configs/models``,
and Hugging Face text towers loaded from a local directory. Nothing is downloaded: weights are local files.
"""
from __future__ import annotations

from clip_dro.errors import UserError

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch

from clip_dro.resources import MODEL_CONFIGS_DIR

_registered = False


class ModelError(UserError):
    """A model name, weights file or text tower that cannot be used."""


def register_model_configs() -> None:
    """Add the JSON architectures under ``configs/models`` to open_clip's registry (once)."""
    global _registered
    if not _registered and MODEL_CONFIGS_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIGS_DIR)
        _registered = True


def list_models() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@dataclass
class ModelBundle:
    """A model with the pieces that belong to it: train/eval image transforms and its tokenizer."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_eval: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str


def _hf_text_cfg(name: str, text_tower: str, pretrained: bool) -> dict[str, Any]:
    text_dir = Path(text_tower)
    if not (text_dir / "config.json").is_file():
        raise ModelError(f"model.text_tower: {text_dir} is not a local Hugging Face model directory (no config.json)")
    model_type = json.loads((text_dir / "config.json").read_text()).get("model_type")
    if model_type not in open_clip.hf_configs.arch_dict:
        # open_clip's HF adapter needs per-architecture attribute names; DistilBERT, for one, is not among them.
        raise ModelError(f"model.text_tower: {text_dir} is a {model_type!r} model; open_clip supports text towers of "
                         f"type {', '.join(sorted(open_clip.hf_configs.arch_dict))} (e.g. BERT, MiniLM, RoBERTa)")
    text_cfg = copy.deepcopy(open_clip.get_model_config(name)["text_cfg"])
    text_cfg["hf_model_name"] = str(text_dir)
    text_cfg["hf_tokenizer_name"] = str(text_dir)
    text_cfg["hf_model_pretrained"] = pretrained
    return text_cfg


def build_model(
    name: str,
    pretrained: Optional[str] = None,
    text_tower: Optional[str] = None,
    text_tower_pretrained: bool = True,
) -> ModelBundle:
    """Build ``name`` with random weights, or with the weights of the local file ``pretrained``.

    ``text_tower`` is required for architectures whose text tower is a transformers model; it names a local
    directory holding that model's config and tokenizer (and weights when ``text_tower_pretrained``).
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise ModelError(f"model.name: unknown model {name!r}; known: tiny ones in {MODEL_CONFIGS_DIR} "
                         "and open_clip's (e.g. RN50, ViT-B-32)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise ModelError(f"model.pretrained: {pretrained!r} is not a local file (weights load from local paths only)")
    model_cfg = open_clip.get_model_config(name)
    is_hf_text = "hf_model_name" in model_cfg["text_cfg"]
    kwargs: dict[str, Any] = {}
    if is_hf_text:
        if text_tower is None:
            raise ModelError(f"model.text_tower: model {name!r} has a Hugging Face text tower; "
                             "set model.text_tower to its local directory")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kwargs["text_cfg"] = _hf_text_cfg(name, text_tower, text_tower_pretrained and pretrained is None)
    elif text_tower is not None:
        raise ModelError(f"model.text_tower: model {name!r} has its own text tower; remove model.text_tower")

    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, **kwargs)
    if is_hf_text:
        text_cfg = kwargs["text_cfg"]
        tokenizer = open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
    else:
        tokenizer = open_clip.get_tokenizer(name)
    return ModelBundle(model, preprocess_train, preprocess_eval, tokenizer, name)
