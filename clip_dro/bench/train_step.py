"""A full training step (forward, loss with its state update, backward, AdamW) of the same model with
iSogCLR and with CLIP, timed side by side."""
from __future__ import annotations

import statistics
import time

import torch

from clip_dro.losses import build_loss
from clip_dro.models import build_model
from clip_dro.optim import build_optimizer


def _step(model, loss_fn, optimizer, images, tokens, image_index, text_index, dtype) -> None:
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        image_features, text_features, _ = model(images, tokens)
    loss = loss_fn(image_features.float(), text_features.float(), image_index, text_index)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_fn.after_optimizer_step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_step(model_name: str = "tiny-vit", batch_size: int = 128, repeats: int = 10,
                     num_samples: int = 100_000, seed: int = 0, device: str = "cpu",
                     precision: str = "fp32") -> dict:
    """Median seconds per step for iSogCLR (ours) and CLIP (baseline) on identical random batches; the runs
    alternate step by step so that both see the same machine load. On a GPU it also reports peak memory."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    setups = {}
    for name in ("isogclr", "clip"):
        bundle = build_model(model_name)
        model = bundle.model.to(dev).train()
        loss_fn = build_loss(name, num_samples, num_samples, tau_init=0.05, tau_min=0.01, rho=3.0).to(dev)
        setups[name] = (model, loss_fn, build_optimizer(model, loss_fn.parameters(), 1e-4, 0.1))
    image_size = bundle.preprocess_eval.transforms[0].size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    context = bundle.tokenizer(["x"]).shape[1]
    times: dict[str, list[float]] = {"isogclr": [], "clip": []}
    peak: dict[str, float] = {}
    for i in range(repeats + 2):
        images = torch.randn(batch_size, 3, image_size, image_size, device=dev)
        tokens = torch.randint(1, 1000, (batch_size, context), device=dev)
        index = torch.randperm(num_samples, device=dev)[:batch_size]
        for name, (model, loss_fn, optimizer) in setups.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            start = time.perf_counter()
            _step(model, loss_fn, optimizer, images, tokens, index, index, dtype)
            _sync(dev)
            if i >= 2:  # the first steps allocate optimizer state and warm caches
                times[name].append(time.perf_counter() - start)
            if dev.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(dev) / 2**30
    ours, base = statistics.median(times["isogclr"]), statistics.median(times["clip"])
    result = {"case": "train_step", "model": model_name, "B": batch_size, "device": device, "precision": precision,
              "ours_s": ours, "baseline_s": base, "ratio": ours / base, "target": 1.05,
              "ours_samples_per_s": batch_size / ours, "baseline_samples_per_s": batch_size / base}
    if peak:
        result.update(ours_peak_gib=peak["isogclr"], baseline_peak_gib=peak["clip"])
    return result
