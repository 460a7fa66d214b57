"""Contrastive losses with per-sample state: CLIP, SogCLR, iSogCLR and RGCL-g, and SigLIP (design.md §4).

    from clip_dro.losses import ISogCLRLoss
    loss_fn = ISogCLRLoss(num_images, num_texts, rho=6.0, tau_init=0.01)
    loss = loss_fn(image_features, text_features, image_index, text_index)  # updates s, m, τ
    loss.backward()
"""
from clip_dro.losses.base import ContrastiveLoss
from clip_dro.losses.clip import CLIPLoss
from clip_dro.losses.factory import LOSSES, build_loss
from clip_dro.losses.isogclr import ISogCLRLoss, RGCLgLoss, SogCLRLoss
from clip_dro.losses.schedules import check_rho, gamma_at
from clip_dro.losses.siglip import SigLIPLoss
from clip_dro.losses.state import LossIndexError, LossStateSizeError

__all__ = ["CLIPLoss", "ContrastiveLoss", "ISogCLRLoss", "LOSSES", "LossIndexError", "LossStateSizeError",
           "RGCLgLoss", "SigLIPLoss", "SogCLRLoss", "build_loss", "check_rho", "gamma_at"]
