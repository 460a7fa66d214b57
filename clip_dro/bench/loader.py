"""Benchmark case "loader": samples per second the training loader delivers (decode, augment, tokenize)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from clip_dro.data.train_loader import TrainLoader


def bench_loader(data_dir: str | Path, preprocess: Callable, tokenizer: Callable[[list[str]], torch.Tensor],
                 batch_size: int, steps: int, workers: int, lanes: Optional[int] = None) -> dict:
    """Read ``steps`` batches (continuing into later epochs if needed) after one warm-up batch, which pays
    the worker start-up and is reported apart as ``startup_s``. ``ours_s`` is seconds per batch."""
    loader = TrainLoader(data_dir, preprocess, tokenizer, batch_size, seed=0, workers=workers, lanes=lanes)
    start = time.perf_counter()
    timed_start, done, epoch = None, -1, 0
    while done < steps:
        for _ in loader.epoch(epoch):
            if timed_start is None:
                timed_start = time.perf_counter()
            done += 1
            if done == steps:
                break
        epoch += 1
    end = time.perf_counter()
    assert timed_start is not None
    seconds = end - timed_start
    return {"case": "loader", "batch_size": batch_size, "steps": steps, "workers": workers, "lanes": loader.lanes,
            "startup_s": timed_start - start, "ours_s": seconds / steps,
            "samples_per_s": steps * batch_size / seconds}
