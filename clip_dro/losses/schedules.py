"""How the loss hyperparameters move during training (γ), and the start-up check of ρ against the batch."""
from __future__ import annotations

import math
from typing import Optional

from clip_dro.config import GAMMA_SCHEDULES
from clip_dro.errors import UserError


def gamma_at(epoch: float, gamma: float, schedule: str, decay_epochs: float) -> float:
    """The moving-average weight γ at a (fractional) epoch.

    ``constant``: γ throughout. ``cosine`` (as in FastCLIP): γ(e) = γ + (1 − γ)·(1 + cos(π·e/E))/2 for
    e < E = ``decay_epochs``, i.e. 1 at the start (the moving average is then the batch estimate) falling to γ
    at epoch E, and γ afterwards.
    """
    if schedule == "constant":
        return gamma
    if schedule == "cosine":
        progress = min(max(epoch, 0.0) / decay_epochs, 1.0)
        return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserError(f"loss.gamma_schedule = {schedule!r}: must be one of {', '.join(GAMMA_SCHEDULES)}")


def check_rho(rho: float, global_batch: int) -> Optional[str]:
    """A warning when ρ ≥ log(B − 1) for the global batch B, otherwise None.

    The KL divergence of a batch softmax over B − 1 negatives from the uniform one is at most log(B − 1), so
    with ρ that large the temperature gradient G stays positive and every temperature sinks to τ_min.
    """
    if global_batch < 2:
        return f"global batch {global_batch} has no negatives: contrastive losses need at least 2 pairs"
    limit = math.log(global_batch - 1)
    if rho < limit:
        return None
    return (f"loss.rho = {rho:g} >= log(B-1) = {limit:.3f} for the global batch B = {global_batch}: the KL of a "
            f"batch softmax cannot exceed log(B-1), so every temperature will sink to loss.tau_min; "
            f"use loss.rho < {limit:.2f} or a larger batch")
