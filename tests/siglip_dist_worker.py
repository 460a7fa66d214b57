"""SigLIP under ``torchrun --nproc_per_node 2`` (gloo, CPU), run by test_siglip.py: the records of
losses_dist_worker's DDP loop for loss.name siglip, saved to OUT/rank{r}.pt."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from losses_dist_worker import run_steps


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.save(run_steps("siglip", dist.get_rank(), dist.get_world_size()), f"{out_dir}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
