"""Build a loss from its configured name (``loss.name``) and the ``loss.*`` keywords."""
from __future__ import annotations

from clip_dro.errors import UserError
from clip_dro.losses.base import ContrastiveLoss
from clip_dro.losses.clip import CLIPLoss
from clip_dro.losses.isogclr import ISogCLRLoss, RGCLgLoss, SogCLRLoss
from clip_dro.losses.siglip import SigLIPLoss

LOSSES: dict[str, type[ContrastiveLoss]] = {
    "clip": CLIPLoss,
    "sogclr": SogCLRLoss,
    "isogclr": ISogCLRLoss,
    "rgclg": RGCLgLoss,
    "siglip": SigLIPLoss,
}


def build_loss(name: str, num_images: int, num_texts: int, **loss_kwargs) -> ContrastiveLoss:
    """The loss called ``name`` (clip | sogclr | isogclr | rgclg | siglip) for a dataset of these sizes."""
    if name not in LOSSES:
        raise UserError(f"loss.name = {name!r}: must be one of {', '.join(LOSSES)}")
    return LOSSES[name](num_images, num_texts, **loss_kwargs)
