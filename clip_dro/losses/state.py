"""Per-sample state indexed by global image/text indices, and the rule for ids repeated within a batch.

Duplicate rule: positions of one global batch that carry the same id form a group. Each position computes
its own batch estimate (g, G) from the state as it was before the step; the group then applies ONE update to
that id, using the mean of its positions' g (and of their clipped G), and every position of the group uses
the resulting state. The rule does not depend on the order of the batch, and every position of a group writes
the same value, so scattered writes are deterministic.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from clip_dro.errors import UserError

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class LossIndexError(UserError, IndexError):
    """A global image/text index outside the loss state (the data and the loss disagree on the dataset)."""


class LossStateSizeError(UserError):
    """A loss state built for a dataset of another size (for example a checkpoint of another dataset)."""


def check_indices(index: Tensor, size: int, name: str, batch: int) -> None:
    """Raise a clear error unless ``index`` is a 1-D integer tensor of ``batch`` entries in [0, size).

    Costs one device synchronisation when ``index`` lives on an accelerator; pass CPU indices to avoid it.
    """
    if not isinstance(index, Tensor) or index.dtype not in _INTEGER_DTYPES:
        raise LossIndexError(f"{name} must be an integer tensor of global indices, got "
                             f"{getattr(index, 'dtype', type(index).__name__)}")
    if index.dim() != 1 or index.numel() != batch:
        raise LossIndexError(f"{name} has shape {tuple(index.shape)}, expected ({batch},) to match the features")
    if batch == 0:
        return
    low, high = (int(v) for v in torch.aminmax(index.detach().long()))
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise LossIndexError(f"{name} {bad} is outside the loss state [0, {size}): the loss was built for "
                             f"{size} {'images' if name.startswith('image') else 'texts'}")


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


class SideState(nn.Module):
    """The state of one side (images or texts): s in log form, a visited flag, and optionally τ and m.

    s is kept as log s (float32): exp(h/τ) reaches e^400 at τ_min = 0.005, but its logarithm is small, and
    log s never overflows or underflows however far the scale of g moves between visits.
    Memory: 4 (log s) + 1 (visited) bytes per sample, + 4 (τ) + 4 (m) with individual temperatures.
    """

    def __init__(self, size: int, tau_init: float, individual_tau: bool) -> None:
        super().__init__()
        self.register_buffer("log_s", torch.zeros(size))
        self.register_buffer("visited", torch.zeros(size, dtype=torch.bool))
        if individual_tau:
            self.register_buffer("tau", torch.full((size,), float(tau_init)))
            self.register_buffer("m", torch.zeros(size))

    def bytes_per_sample(self) -> int:
        return sum(buffer.element_size() for buffer in self.buffers())

    def next_log_s(self, ids: Tensor, log_g: Tensor, group: Tensor, gamma: float) -> Tensor:
        """log s after this step at each position: g on a first visit, else (1 − γ)·s + γ·g (g: group mean)."""
        log_g = group_log_mean_exp(log_g, group)
        if gamma >= 1.0:
            return log_g
        old = self.log_s[ids].to(log_g.dtype)
        blended = torch.logaddexp(old + math.log1p(-gamma), log_g + math.log(gamma))
        return torch.where(self.visited[ids], blended, log_g)

    def write_log_s(self, ids: Tensor, log_s: Tensor) -> None:
        self.log_s[ids] = log_s.to(self.log_s.dtype)
        self.visited[ids] = True

    def step_tau(self, ids: Tensor, grad: Tensor, group: Tensor, tau_used: Tensor, *, momentum: float,
                 clip: float, lr: float, tau_min: float, tau_max: float, hold: bool) -> None:
        """m ← (1 − β)·m + β·clip(G, −c, c) (group mean); then, unless held, τ ← clamp(τ − η·m, τ_min, τ_max)."""
        clipped = group_mean(grad.clamp(-clip, clip), group)
        m = (1.0 - momentum) * self.m[ids].to(clipped.dtype) + momentum * clipped
        self.m[ids] = m.to(self.m.dtype)
        if not hold:
            self.tau[ids] = (tau_used.to(m.dtype) - lr * m).clamp(tau_min, tau_max).to(self.tau.dtype)
