"""A full training step (forward, loss with its state update, backward, AdamW) of the same model with
iSogCLR and with CLIP, timed side by side."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from clip_dro.losses import build_loss
from clip_dro.models import build_model
from clip_dro.optim import build_optimizer


def train_step(model, loss_fn, optimizer, images, tokens, image_index, text_index,
               dtype: Optional[torch.dtype] = None) -> None:
    """One step as the trainer takes it: forward (under autocast to ``dtype``, if any), loss with its state
    update, backward, optimizer step."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        image_features, text_features, _ = model(images, tokens)
    loss = loss_fn(image_features.float(), text_features.float(), image_index, text_index)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_fn.after_optimizer_step()


@dataclass
class StepSetup:
    """A model in train mode with its loss and optimizer, and the shape of the batches it takes."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: Any
    image_size: int
    context: int


def step_setup(loss: str, num_samples: int, device: str = "cpu", image_size: Optional[int] = None,
               loss_keys: Optional[dict] = None, **model_keys) -> StepSetup:
    """``build_model(**model_keys)`` with ``build_loss(loss, num_samples, num_samples, **loss_keys)`` and AdamW
    (lr 1e-4, weight decay 0.1); the image size defaults to the model's own."""
    bundle = build_model(**model_keys)
    model = bundle.model.to(device).train()
    loss_fn = build_loss(loss, num_samples, num_samples, **(loss_keys or {})).to(device)
    if image_size is None:
        size = bundle.preprocess_eval.transforms[0].size
        image_size = size if isinstance(size, int) else size[0]
    return StepSetup(model, loss_fn, build_optimizer(model, loss_fn.parameters(), 1e-4, 0.1), image_size,
                     bundle.tokenizer(["x"]).shape[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_step_times(setups: dict[str, StepSetup], batch_size: int, repeats: int, num_samples: int,
                           device: str = "cpu", dtype: Optional[torch.dtype] = None, warmup: int = 2,
                           token_range: tuple[int, int] = (1, 1000)
                           ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each setup's ``repeats`` timed steps, and on a GPU its peak memory (GiB). Every round
    steps each setup once, back to back, so that all see the same machine load; setups whose batches have
    one shape get the same random batch. The first ``warmup`` rounds are not timed (they allocate optimizer
    state and warm caches)."""
    dev = torch.device(device)
    times: dict[str, list[float]] = {label: [] for label in setups}
    peak: dict[str, float] = {}
    for i in range(repeats + warmup):
        batches: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        index = torch.randperm(num_samples, device=dev)[:batch_size]
        for label, s in setups.items():
            if (s.image_size, s.context) not in batches:
                batches[s.image_size, s.context] = (
                    torch.randn(batch_size, 3, s.image_size, s.image_size, device=dev),
                    torch.randint(*token_range, (batch_size, s.context), device=dev))
            images, tokens = batches[s.image_size, s.context]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            start = time.perf_counter()
            train_step(s.model, s.loss_fn, s.optimizer, images, tokens, index, index, dtype)
            _sync(dev)
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
            if dev.type == "cuda":
                peak[label] = torch.cuda.max_memory_allocated(dev) / 2**30
    return times, peak


def bench_train_step(model_name: str = "tiny-vit", batch_size: int = 128, repeats: int = 10,
                     num_samples: int = 100_000, seed: int = 0, device: str = "cpu",
                     precision: str = "fp32") -> dict:
    """Median seconds per step for iSogCLR (ours) and CLIP (baseline) on identical random batches; the runs
    alternate step by step so that both see the same machine load. On a GPU it also reports peak memory."""
    torch.manual_seed(seed)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loss_keys = dict(tau_init=0.05, tau_min=0.01, rho=3.0)
    setups = {name: step_setup(name, num_samples, device, loss_keys=loss_keys, name=model_name)
              for name in ("isogclr", "clip")}
    times, peak = interleaved_step_times(setups, batch_size, repeats, num_samples, device, dtype)
    ours, base = statistics.median(times["isogclr"]), statistics.median(times["clip"])
    result = {"case": "train_step", "model": model_name, "B": batch_size, "device": device, "precision": precision,
              "ours_s": ours, "baseline_s": base, "ratio": ours / base, "target": 1.05,
              "ours_samples_per_s": batch_size / ours, "baseline_samples_per_s": batch_size / base}
    if peak:
        result.update(ours_peak_gib=peak["isogclr"], baseline_peak_gib=peak["clip"])
    return result
