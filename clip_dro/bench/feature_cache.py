"""Training steps from the feature cache against steps through the locked towers, the batches included (the
loader decoding images with the eval transform, or the cache's gather of rows), timed side by side."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from clip_dro.bench.train_step import train_step
from clip_dro.data.train_loader import TrainBatch, TrainLoader
from clip_dro.feature_cache import cached_training
from clip_dro.losses import build_loss
from clip_dro.models import build_model
from clip_dro.optim import build_optimizer


def _steps_per_s(model: torch.nn.Module, batches: Iterator[TrainBatch], steps: int, num_images: int,
                 num_texts: int, loss: str, loss_keys: dict[str, Any]) -> float:
    loss_fn = build_loss(loss, num_images, num_texts, **loss_keys)
    optimizer = build_optimizer(model, loss_fn.parameters(), 1e-4, 0.1)

    def step() -> None:
        b = next(batches)
        train_step(model, loss_fn, optimizer, b.images, b.tokens, b.image_index, b.text_index)

    step()  # the first step pays for the loader's start and the allocator
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def bench_feature_cache(data_dir: Path, batch_size: int = 128, steps: int = 10, workers: int = 1,
                        loss: str = "isogclr", loss_keys: Optional[dict[str, Any]] = None, **model_keys: Any
                        ) -> dict[str, Any]:
    """Steps/s of the same locked model from the cache and through its towers (``model_keys`` as
    ``build_model`` takes them, tiny-vit by default; ``loss_keys`` as ``build_loss``); the cache is built
    first, its time reported apart."""
    loss_keys = loss_keys or {}
    model_keys = {"name": "tiny-vit", **model_keys, "lock_image": True, "lock_text": True}
    bundle = build_model(**model_keys)
    loader = TrainLoader(data_dir, bundle.preprocess_eval, bundle.tokenizer, batch_size, seed=0, workers=workers)
    m = loader.manifest
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        heads, cached = cached_training(tmp, model_keys["name"], bundle.model, loader, bundle.preprocess_eval,
                                        torch.device("cpu"), batch_size)
        build_s = time.perf_counter() - start
        from_cache = _steps_per_s(heads, iter(cached.epoch(0)), steps, m.num_images, m.num_texts, loss, loss_keys)
    towers = _steps_per_s(bundle.model, iter(loader.epoch(0)), steps, m.num_images, m.num_texts, loss, loss_keys)
    return {"case": f"feature_cache_{model_keys['name']}", "B": batch_size, "workers": workers,
            "ours_s": 1.0 / from_cache, "baseline_s": 1.0 / towers, "ratio": towers / from_cache, "target": "< 1",
            "speedup": from_cache / towers,
            "cache_steps_per_s": from_cache, "towers_steps_per_s": towers, "cache_build_s": build_s,
            "samples": m.num_samples,
            "note": "ratio = step time from the feature cache / step time through the locked towers (eval "
                    "transform, loader included); speedup = its inverse"}
