"""The update rules of the robust losses' state (design.md §4.1 steps 2, 5, 6): s, and τ as each loss keeps it.

Duplicate rule: positions of one global batch that carry the same id form a group. Each position computes
its own batch estimate (g, G) from the state as it was before the step; the group then applies ONE update to
that id, using the mean of its positions' g (and of their clipped G), and every position of the group uses
the resulting state. The rule does not depend on the order of the batch, and every position of a group writes
the same value, so scattered writes are deterministic.

How τ is kept is a policy, chosen once by the loss class: ``FixedTau`` (SogCLR: τ_init for every sample),
``IndividualTau`` (iSogCLR: τ and m per sample, in the state) and ``GlobalTau`` (RGCL-g: one learned τ).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from torch import Tensor

from clip_dro.losses.base import expanded
from clip_dro.losses.state import BatchState, SideState

if TYPE_CHECKING:
    from clip_dro.losses.isogclr import RobustLoss


def duplicate_groups(ids: Tensor) -> Tensor:
    """Group number of each position: equal exactly for positions holding the same id, in [0, len(ids)).

    Sort-based with fixed shapes, so it needs no device synchronisation (unlike ``torch.unique``).
    """
    order = torch.argsort(ids, stable=True)
    ranked = ids[order]
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[1:] = ranked[1:] != ranked[:-1]
    group_of_ranked = torch.cumsum(starts, 0) - 1
    return torch.empty_like(group_of_ranked).scatter_(0, order, group_of_ranked)


def group_mean(values: Tensor, group: Tensor) -> Tensor:
    """For each position, the mean of ``values`` over the positions of its group."""
    sums = torch.zeros_like(values).scatter_add_(0, group, values)
    counts = torch.zeros_like(values).scatter_add_(0, group, torch.ones_like(values))
    return sums[group] / counts[group]


def group_log_mean_exp(log_values: Tensor, group: Tensor) -> Tensor:
    """For each position, log of the mean of exp(``log_values``) over its group, without overflow."""
    peak = torch.full_like(log_values, -math.inf).scatter_reduce_(0, group, log_values, "amax")[group]
    return peak + torch.log(group_mean(torch.exp(log_values - peak), group))


def next_log_s(old: BatchState, log_g: Tensor, group: Tensor, gamma: float) -> Tensor:
    """log s after this step at each position: g on a first visit, else (1 − γ)·s + γ·g (g: group mean)."""
    log_g = group_log_mean_exp(log_g, group)
    if gamma >= 1.0:
        return log_g
    blended = torch.logaddexp(old.log_s.to(log_g.dtype) + math.log1p(-gamma), log_g + math.log(gamma))
    return torch.where(old.visited, blended, log_g)


def next_tau(old: BatchState, grad: Tensor, group: Tensor, tau_used: Tensor, *, momentum: float, clip: float,
             lr: float, tau_min: float, tau_max: float, hold: bool) -> tuple[Tensor, Tensor]:
    """(τ, m) after this step: m ← (1 − β)·m + β·clip(G, −c, c) (group mean); then, unless held,
    τ ← clamp(τ − η·m, τ_min, τ_max)."""
    clipped = group_mean(grad.clamp(-clip, clip), group)
    m = (1.0 - momentum) * old.m.to(clipped.dtype) + momentum * clipped
    tau = tau_used if hold else (tau_used.to(m.dtype) - lr * m).clamp(tau_min, tau_max)
    return tau, m


class TauStep(NamedTuple):
    """One side's step, as a τ policy sees it: the state read before the step, G_k at each position, the
    positions' duplicate groups and the τ they used."""

    old: BatchState
    grad: Tensor
    group: Tensor
    tau_used: Tensor


class SideTau(NamedTuple):
    """Per-sample (τ, m) of a batch's positions after the step, to store; None without per-sample τ."""

    tau: Optional[Tensor] = None
    m: Optional[Tensor] = None


class TauPolicy(ABC):
    """How a robust loss keeps its temperatures. The loss's hyperparameters (``tau_init``, ``tau_lr``, ...)
    and buffers are its own; a policy reads and updates them."""

    per_sample = False  # whether each side's state holds τ and m per sample
    learned = False  # whether τ follows the gradient of the robust objective (then ρ matters)

    def attach(self, loss: "RobustLoss") -> None:
        """Register what the policy keeps beyond the per-sample state as buffers of ``loss``."""

    @abstractmethod
    def used(self, loss: "RobustLoss", state: BatchState, length: int, device: torch.device) -> Tensor:
        """τ of a batch's ``length`` positions, as read before the step."""

    def update(self, loss: "RobustLoss", image: TauStep, text: TauStep) -> tuple[SideTau, SideTau]:
        """Move τ after the step (held during the warm-up); per side, what the state stores."""
        return SideTau(), SideTau()

    @abstractmethod
    def every(self, loss: "RobustLoss", side: SideState, size: int) -> Tensor:
        """τ of every id of ``side`` (length ``size``)."""

    def owned(self, loss: "RobustLoss") -> Optional[dict[str, tuple[Tensor, Tensor]]]:
        """Per side, (global ids, τ) of the samples this process owns; None without per-sample τ."""
        return None

    @abstractmethod
    def batch_mean(self, loss: "RobustLoss", stored: SideTau) -> Tensor:
        """Mean τ of a side's batch after the step."""


class FixedTau(TauPolicy):
    """SogCLR: τ = ``tau_init`` for every sample, never updated; seen per sample as a view (no memory)."""

    def used(self, loss: "RobustLoss", state: BatchState, length: int, device: torch.device) -> Tensor:
        return torch.full((length,), loss.tau_init, device=device)

    def every(self, loss: "RobustLoss", side: SideState, size: int) -> Tensor:
        return expanded(torch.tensor(loss.tau_init, device=side.log_s.device), size)

    def batch_mean(self, loss: "RobustLoss", stored: SideTau) -> Tensor:
        return torch.tensor(loss.tau_init)


class IndividualTau(TauPolicy):
    """iSogCLR: τ and its moving average m per sample, in the state (design.md §4.1 step 6)."""

    per_sample = learned = True

    def used(self, loss: "RobustLoss", state: BatchState, length: int, device: torch.device) -> Tensor:
        return state.tau

    def update(self, loss: "RobustLoss", image: TauStep, text: TauStep) -> tuple[SideTau, SideTau]:
        held = loss.tau_held()
        return tuple(SideTau(*next_tau(step.old, step.grad, step.group, step.tau_used, momentum=loss.tau_momentum,
                                       clip=loss.tau_grad_clip, lr=loss.tau_lr, tau_min=loss.tau_min,
                                       tau_max=loss.tau_max, hold=held))
                     for step in (image, text))  # type: ignore[return-value]

    def every(self, loss: "RobustLoss", side: SideState, size: int) -> Tensor:
        return side.full("tau")

    def owned(self, loss: "RobustLoss") -> Optional[dict[str, tuple[Tensor, Tensor]]]:
        return {"image": (loss.img.shard.ids(loss.num_images), loss.img.tau),
                "text": (loss.txt.shard.ids(loss.num_texts), loss.txt.tau)}

    def batch_mean(self, loss: "RobustLoss", stored: SideTau) -> Tensor:
        return stored.tau.float().mean()


class GlobalTau(TauPolicy):
    """RGCL-g: ONE temperature for all samples, the loss's buffers ``tau`` and ``tau_m`` (one element each).

    It follows the derivative of the design.md §4.1 objective with every τ tied together: G = mean over the
    global batch of (G^I_k + G^T_k), m ← (1−β)·m + β·clip(G, −c, c), τ ← clamp(τ − η·m, τ_min, τ_max), held
    during the warm-up.
    """

    learned = True

    def attach(self, loss: "RobustLoss") -> None:
        loss.register_buffer("tau", torch.tensor([loss.tau_init]))
        loss.register_buffer("tau_m", torch.zeros(1))

    def used(self, loss: "RobustLoss", state: BatchState, length: int, device: torch.device) -> Tensor:
        return loss.tau.expand(length)

    def update(self, loss: "RobustLoss", image: TauStep, text: TauStep) -> tuple[SideTau, SideTau]:
        grad = (image.grad + text.grad).mean().clamp(-loss.tau_grad_clip, loss.tau_grad_clip)
        m = (1.0 - loss.tau_momentum) * loss.tau_m.double() + loss.tau_momentum * grad
        loss.tau_m.copy_(m)
        if not loss.tau_held():
            loss.tau.copy_((loss.tau.double() - loss.tau_lr * m).clamp(loss.tau_min, loss.tau_max))
        return SideTau(), SideTau()

    def every(self, loss: "RobustLoss", side: SideState, size: int) -> Tensor:
        return expanded(loss.tau, size)

    def batch_mean(self, loss: "RobustLoss", stored: SideTau) -> Tensor:
        return loss.tau.mean()
