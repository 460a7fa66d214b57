"""Agreements between the processes of a run: each process contributes what it saw, all take one decision."""
from __future__ import annotations

import torch
from accelerate.utils import reduce


def sum_over_processes(device: torch.device, *values: float) -> list[float]:
    """Each value summed over all processes, in one all-reduce (a collective: every process must call it), so
    that every process takes the same decision and none goes on alone into a collective."""
    return reduce(torch.tensor([float(v) for v in values], device=device), reduction="sum").tolist()
