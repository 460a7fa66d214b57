"""AdamW with open_clip's no-decay groups, and a linear-warmup cosine learning-rate schedule by step."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # As open_clip's trainer: gains, biases, norms, embeddings-as-vectors and temperatures are not decayed.
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, extra_params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters plus ``extra_params`` (a loss's own learnable temperature),
    the latter never decayed."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)] + [p for p in extra_params if p.requires_grad]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate over ``warmup_steps``, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
