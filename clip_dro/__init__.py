"""clip_dro: CLIP training with iSogCLR's two-sided robust contrastive loss and individualized temperatures."""

__version__ = "0.1.0"
