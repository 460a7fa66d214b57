"""Benchmark: one loss step (forward + backward + state update) of iSogCLR against open_clip's ClipLoss, and
of our SigLIP (open_clip's SigLipLoss inside the loss interface) against open_clip's SigLipLoss called directly."""
from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from tqdm import tqdm

from clip_dro.losses import ISogCLRLoss, SigLIPLoss


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _medians(ours: Callable[[], None], baseline: Callable[[], None], repeats: int,
             dev: torch.device) -> tuple[float, float]:
    """Median seconds of each, run interleaved after a warm-up step of each."""
    with warnings.catch_warnings():  # ρ against this B is irrelevant to timing
        warnings.simplefilter("ignore")
        ours(), baseline()  # warm-up
    ours_times, baseline_times = [], []
    for _ in range(repeats):
        ours_times.append(_timed(ours, dev))
        baseline_times.append(_timed(baseline, dev))
    return statistics.median(ours_times), statistics.median(baseline_times)


def bench_loss_step(batch_sizes: tuple[int, ...] = (256, 1024, 4096), dim: int = 512, repeats: int = 7,
                    device: str = "cpu", seed: int = 0) -> list[dict]:
    """Median seconds of a loss step of ``ISogCLRLoss`` and of open_clip ``ClipLoss`` (case ``loss_step``),
    and of ``SigLIPLoss`` and open_clip ``SigLipLoss`` (case ``loss_step_siglip``), for each batch size B.

    Each pair gets the same random normalized float32 features (requiring grad) and runs interleaved, one of
    each per repeat after a warm-up step, so that drifts of the machine hit both alike. iSogCLR's state is
    sized B with the batch's indices a random permutation, so every step after the first revisits every sample.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for size in tqdm(batch_sizes, desc="loss step", disable=None):
        image = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(dev)
        text = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(dev)
        ids = torch.randperm(size, generator=gen).to(dev)
        ours_loss = ISogCLRLoss(size, size).to(dev)
        clip_loss = ClipLoss()
        log_scale = torch.tensor(math.log(1 / 0.07), device=dev, requires_grad=True)

        def ours() -> None:
            x, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            ours_loss(x, t, ids, ids).backward()

        def baseline() -> None:
            x, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            clip_loss(x, t, log_scale.exp()).backward()

        ours_s, baseline_s = _medians(ours, baseline, repeats, dev)
        results.append({"case": "loss_step", "B": size, "d": dim, "ours_s": ours_s, "baseline_s": baseline_s,
                        "ratio": ours_s / baseline_s, "repeats": repeats, "device": str(dev)})

        our_siglip, open_clip_siglip = SigLIPLoss(size, size).to(dev), SigLipLoss()
        scale = torch.tensor(math.log(10), device=dev, requires_grad=True)
        bias = torch.tensor(-10.0, device=dev, requires_grad=True)

        def ours_siglip() -> None:
            x, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            our_siglip(x, t, ids, ids).backward()

        def baseline_siglip() -> None:
            x, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            open_clip_siglip(x, t, scale.exp(), bias).backward()

        ours_s, baseline_s = _medians(ours_siglip, baseline_siglip, repeats, dev)
        results.append({"case": "loss_step_siglip", "B": size, "d": dim, "ours_s": ours_s, "baseline_s": baseline_s,
                        "ratio": ours_s / baseline_s, "repeats": repeats, "device": str(dev)})
    return results


if __name__ == "__main__":
    for row in bench_loss_step():
        print(row)
