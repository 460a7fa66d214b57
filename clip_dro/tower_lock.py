"""Locked towers (LiT), as open_clip spells them: ``model.lock_image_tower`` / ``model.lock_text_tower`` freeze
the towers (and their timm / Hugging Face implementations do their own part), then the towers' final
projections, the *heads*, are made trainable again.

Why the heads train. open_clip is not consistent about them: its timm and Hugging Face towers leave their
projection (``visual.head``, ``text.proj``) trainable when locked, its own ViT and text transformer freeze
theirs (``visual.proj``, ``text_projection``). With both towers locked the open_clip way nothing but the logit
scale (which our losses replace) would train; here locking means "everything but the head", for every
tower, so that both towers locked trains a linear map on each side of fixed features (design.md §12). The
heads keep their open_clip names, so checkpoints load into ``open_clip.create_model`` unchanged.

A tower locked entirely runs in eval mode throughout training (no dropout, BatchNorm on its running
statistics): its output is then a fixed function of its input, which is what the feature cache
(:mod:`clip_dro.feature_cache`) stores. Partly unlocked towers train as open_clip trains them.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Head:
    """A tower's final projection: ``getattr(owner, name)``, a parameter (``x @ p``) or a module."""

    owner: nn.Module
    name: str

    @property
    def value(self) -> nn.Parameter | nn.Module:
        return getattr(self.owner, self.name)

    def parameters(self) -> list[nn.Parameter]:
        value = self.value
        return [value] if isinstance(value, nn.Parameter) else list(value.parameters())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        value = self.value
        return features @ value if isinstance(value, nn.Parameter) else value(features)


def image_head(model: nn.Module) -> Optional[Head]:
    """open_clip's ViT ends in the parameter ``proj`` (its forward skips it when None), a timm tower in the
    module ``head``; other towers (ModifiedResNet's attention pool) have no separable head."""
    visual = model.visual
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return Head(visual, "proj")
    if isinstance(getattr(visual, "head", None), nn.Module) and hasattr(visual, "trunk"):
        return Head(visual, "head")
    return None


def text_head(model: nn.Module) -> Optional[Head]:
    """CLIP keeps the text projection on the model itself; CustomTextCLIP's towers own ``proj`` (Hugging Face
    adapters) or ``text_projection`` (open_clip's text transformer)."""
    text = getattr(model, "text", model)
    for name in ("proj", "text_projection"):
        if isinstance(getattr(text, name, None), (nn.Parameter, nn.Module)):
            return Head(text, name)
    return None


def _text_modules(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "text"):
        return [model.text]
    return [getattr(model, name) for name in ("transformer", "token_embedding", "ln_final")]


def _train_stays_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _hold_in_eval(module: nn.Module) -> None:
    """Eval mode now and after any later ``train()`` (evaluation restores the model's mode with one)."""
    module.eval()
    module.train = types.MethodType(_train_stays_eval, module)


def _uses_fused_batchnorm(module: nn.Module) -> bool:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return False
    return any(isinstance(m, BatchNormAct2d) for m in module.modules())


def lock_towers(model: nn.Module, *, lock_image: bool = False, unlocked_groups: int = 0,
                freeze_bn_stats: bool = False, lock_text: bool = False, unlocked_layers: int = 0,
                freeze_layer_norm: bool = True) -> None:
    """Lock as configured (the ``model.lock_*`` keys); raises ``ValueError`` for a combination a tower cannot
    take, with the key to change."""
    if lock_image:
        if freeze_bn_stats and _uses_fused_batchnorm(model.visual):
            # open_clip's converter replaces timm's BatchNormAct2d by a plain FrozenBatchNorm2d, dropping the
            # activation fused into it (EfficientNet's): the tower would compute something else.
            raise ValueError("lock_image_freeze_bn_stats: this image tower's BatchNorm layers carry their "
                             "activation (timm's BatchNormAct2d), which open_clip's freezing drops; use "
                             "model.image_batchnorm: frozen instead (timm's converter, the whole tower)")
        model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
        _unlock_head(image_head(model))
        if unlocked_groups == 0:
            _hold_in_eval(model.visual)
    if lock_text:
        if not freeze_layer_norm and not hasattr(getattr(model, "text", None), "config"):
            raise ValueError("lock_text_freeze_layer_norm: false is only supported by Hugging Face text towers "
                             "(open_clip's own text transformer freezes its LayerNorms with the rest)")
        try:
            model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)
        except KeyError:
            # open_clip's HFTextEncoder.lock looks the layers up in a per-architecture table that names them
            # for none of the architectures it ships (open_clip 3.3).
            raise ValueError("lock_text_unlocked_layers: open_clip's Hugging Face text adapter cannot find this "
                             "model's layers to unlock; use 0 (the whole transformer locked)") from None
        _unlock_head(text_head(model))
        if unlocked_layers == 0 and freeze_layer_norm:
            for module in _text_modules(model):
                _hold_in_eval(module)


def _unlock_head(head: Optional[Head]) -> None:
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)


@contextmanager
def heads_removed(model: nn.Module, heads: list[Head]) -> Iterator[None]:
    """The towers without their heads for the block: a parameter head becomes None (open_clip's forwards then
    skip it), a module head the identity, so ``encode_image`` / ``encode_text`` give the features under them."""
    saved = [(head, head.value) for head in heads]
    try:
        for head, value in saved:
            setattr(head.owner, head.name, None if isinstance(value, nn.Parameter) else nn.Identity())
        yield
    finally:
        for head, value in saved:
            setattr(head.owner, head.name, value)
