"""Distributed check of the losses: run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by
test_losses_distributed.py, and imported by that test for the single-process reference.

A tiny DDP-wrapped projection produces the features; each step computes a loss, back-propagates, and takes
an SGD step on the projection and on the loss's own parameters. Every rank saves, per loss, state layout and
step, the loss value, the gradients after DDP's averaging and its loss state (its shard, when sharded), to
OUT/rank{r}.pt.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip_dro.losses import build_loss

NAMES = ("isogclr", "clip", "rgclg", "sogclr")
LAYOUTS = ("sharded", "replicated")
STEPS = 50
NUM_IMAGES, NUM_TEXTS, GLOBAL_BATCH, RAW_DIM, DIM = 12, 14, 8, 6, 5
KWARGS = dict(gamma=0.8, rho=1.0, tau_init=0.05, tau_min=0.03, tau_max=0.2, tau_lr=0.02, tau_momentum=0.9,
              tau_grad_clip=1.0, tau_warmup_steps=1)
# (image ids, text ids) of the global batch per step: revisits, and ids repeated across the two ranks' halves;
# then random draws with replacement, so that most steps hold duplicates.
IDS = [
    ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]),
    ([8, 2, 9, 0, 2, 10, 11, 5], [8, 9, 12, 13, 2, 0, 3, 4]),
    ([1, 3, 5, 7, 9, 11, 0, 6], [13, 1, 5, 7, 13, 11, 10, 6]),
]
_draws = torch.Generator().manual_seed(11)
IDS += [(torch.randint(NUM_IMAGES, (GLOBAL_BATCH,), generator=_draws).tolist(),
         torch.randint(NUM_TEXTS, (GLOBAL_BATCH,), generator=_draws).tolist()) for _ in range(STEPS - len(IDS))]


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(RAW_DIM, DIM, bias=False)
        self.text = nn.Linear(RAW_DIM, DIM, bias=False)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image), dim=1), F.normalize(self.text(text), dim=1)


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for image_ids, text_ids in IDS:
        raw_image = torch.randn(GLOBAL_BATCH, RAW_DIM, generator=gen, dtype=torch.float64)
        raw_text = raw_image + 0.7 * torch.randn(GLOBAL_BATCH, RAW_DIM, generator=gen, dtype=torch.float64)
        out.append((raw_image, raw_text, torch.tensor(image_ids), torch.tensor(text_ids)))
    return out


def run_steps(name: str, rank: int, world_size: int, layout: str = "sharded") -> list[dict]:
    """Train STEPS steps with this process's share of each global batch; the record of every step."""
    torch.manual_seed(0)
    towers = Towers().double()  # float64: 50 steps stay comparable to ~1e-12, not float32's drift
    model = DistributedDataParallel(towers) if world_size > 1 else towers
    loss = build_loss(name, NUM_IMAGES, NUM_TEXTS, state_layout=layout, **KWARGS)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.5)
    share = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    records = []
    for raw_image, raw_text, image_ids, text_ids in batches():
        image, text = model(raw_image[share], raw_text[share])
        value = loss(image, text, image_ids[share], text_ids[share])
        optimizer.zero_grad()
        value.backward()
        grads = {name: p.grad.clone() for name, p in towers.named_parameters()}
        grads.update({"loss." + name: p.grad.clone() for name, p in loss.named_parameters()})
        optimizer.step()
        loss.after_optimizer_step()
        records.append({"value": value.detach().clone(), "grads": grads,
                        "state": {key: v.clone() for key, v in loss.state_dict().items()}})
    return records


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.save({(name, layout): run_steps(name, rank, world_size, layout) for name in NAMES for layout in LAYOUTS},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
