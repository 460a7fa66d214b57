"""The little communication the losses need: which process this is, and gathers without gradient."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(tensor: Tensor, world_size: int) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0 in rank order (no gradient flows back).

    Every process must pass the same shape: the losses assume the same per-process batch everywhere.
    """
    if world_size == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def gather_features(image: Tensor, text: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """All processes' image and text features (in one fused all-gather), without gradient."""
    if world_size == 1:
        return image.detach(), text.detach()
    both = gather_rows(torch.cat([image.detach(), text.detach()], dim=1), world_size)
    return both[:, : image.shape[1]], both[:, image.shape[1]:]
