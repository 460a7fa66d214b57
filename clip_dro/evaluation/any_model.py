"""Any open_clip architecture with weights from a local file, for ``clip-dro eval --model NAME --pretrained FILE``.

The architecture is an open_clip registry name (``ViT-B-32``, ``RN50``, ...) or one of ours
(``configs/models``); the weights are whatever open_clip's own loader reads (``open_clip.load_checkpoint``,
``torch.load`` with ``weights_only=True``): an open_clip state dict in ``.pt``/``.pth``/``.bin`` or
``.safetensors``, an open_clip training checkpoint (``{"state_dict": ...}``), big_vision ``.npz``. An OpenAI JIT
archive (a TorchScript zip, e.g. ``ViT-B-32.pt`` from OpenAI) is read as open_clip reads it
(``open_clip.load_openai_model``: ``torch.jit.load``, rebuilt with QuickGELU, as OpenAI trained it), after
checking that its tensors fit NAME. Nothing is downloaded: a tag such as ``openai`` is refused.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import open_clip
import torch

from clip_dro.errors import first_line
from clip_dro.models import ModelBundle, ModelError, build_model, list_models


def is_torchscript_archive(path: Path) -> bool:
    """A TorchScript zip: its records include ``constants.pkl`` (torch's own test); a state dict saved by
    ``torch.save`` has none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _check_names(name: str, pretrained: Optional[str], text_tower: Optional[str]) -> None:
    if name not in list_models():
        raise ModelError(f"--model {name!r}: not an open_clip architecture nor one of configs/models "
                         "(e.g. ViT-B-32, RN50, tiny-vit)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise ModelError(f"--pretrained {pretrained}: no such file (weights load from local files only; a tag such "
                         "as 'openai' would download: pass the downloaded file)")
    is_hf_text = "hf_model_name" in open_clip.get_model_config(name)["text_cfg"]
    if is_hf_text and text_tower is None:
        raise ModelError(f"--text-tower: model {name!r} has a Hugging Face text tower; name its local directory "
                         "(or package:NAME)")
    if not is_hf_text and text_tower is not None:
        raise ModelError(f"--text-tower: model {name!r} has its own text tower; leave --text-tower out")


def _load_openai_archive(bundle: ModelBundle, path: Path) -> torch.nn.Module:
    """The model of an OpenAI JIT archive as open_clip builds it, once its tensors are shown to fit ``bundle``."""
    try:
        model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    except Exception as exc:  # a damaged or foreign TorchScript archive: torch.jit raises many kinds
        raise ModelError(f"--pretrained {path}: cannot read the TorchScript archive: {first_line(exc)}") from None
    try:
        bundle.model.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"--pretrained {path}: the OpenAI archive does not fit model {bundle.name!r}: "
                         f"{first_line(exc)}") from None
    return model


def load_any_model(name: str, pretrained: Optional[str] = None, text_tower: Optional[str] = None) -> ModelBundle:
    """Model ``name`` with the weights of the local file ``pretrained`` (random weights without it), its eval
    transform and tokenizer. ``text_tower``: the local Hugging Face directory (or ``package:NAME``) of an
    architecture whose text tower is a transformers model."""
    _check_names(name, pretrained, text_tower)
    bundle = build_model(name, text_tower=text_tower, text_tower_pretrained=pretrained is None)
    if pretrained is None:
        return bundle
    path = Path(pretrained)
    if is_torchscript_archive(path):
        bundle.model = _load_openai_archive(bundle, path)
        return bundle
    try:
        open_clip.load_checkpoint(bundle.model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # torch.load's unpickling refusals, load_state_dict's key and shape errors, ...
        raise ModelError(f"--pretrained {path}: cannot load it into model {name!r}: {first_line(exc)}") from None
    return bundle
