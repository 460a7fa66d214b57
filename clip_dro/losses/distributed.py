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


def gather_batch(image: Tensor, text: Tensor, image_index: Tensor, text_index: Tensor, world_size: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All processes' image and text features and their global indices, without gradient, in ONE all-gather.

    The int64 indices travel bit for bit inside the (float32 or float64) feature rows, reinterpreted as that
    dtype: an all-gather copies bytes and never does arithmetic on them, so they arrive exact.
    """
    if world_size == 1:
        return image.detach(), text.detach(), image_index, text_index
    ids = torch.stack([image_index, text_index], 1).to(image.device, torch.int64).contiguous()
    both = gather_rows(torch.cat([image.detach(), text.detach(), ids.view(image.dtype)], dim=1), world_size)
    dim = image.shape[1]
    ids_all = both[:, 2 * dim:].contiguous().view(torch.int64)
    return both[:, :dim], both[:, dim:2 * dim], ids_all[:, 0], ids_all[:, 1]
