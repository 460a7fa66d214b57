"""Well-mixed batches: a table sorted by class gives global batches whose class entropy is that of a random
permutation (prep's seeded row shuffle, then the loader's per-epoch lane cut and shuffle buffer); without the
prep shuffle and the buffer, batches are clustered."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clip_dro.data.train_loader import TrainLoader
from data_prep.tabular import prep_table
from datagen import caption, id_tokenizer, image_bytes

CLASSES, PER_CLASS, BATCH = 16, 24, 32


def _nothing(image) -> torch.Tensor:  # the images play no part here
    return torch.zeros(1)


def entropy(labels) -> float:
    counts = np.bincount(np.asarray(labels), minlength=CLASSES)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def random_permutation_entropy(samples: int = 400) -> float:
    """Mean class entropy of a global batch when the sorted table is read in a uniformly random order."""
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    rng = np.random.default_rng(0)
    values = [entropy(perm[k:k + BATCH]) for perm in (rng.permutation(labels) for _ in range(samples))
              for k in range(0, len(labels) - BATCH + 1, BATCH)]
    return float(np.mean(values))


@pytest.fixture(scope="module")
def sorted_table(module_tmp) -> tuple[Path, Path]:
    """384 images, 24 per class, rows sorted by class (image id // 24)."""
    tmp = module_tmp("sorted")
    (tmp / "images").mkdir()
    jpeg = image_bytes(0, size=(8, 8))
    for i in range(CLASSES * PER_CLASS):
        (tmp / "images" / f"{i:03d}.jpg").write_bytes(jpeg)
    csv = tmp / "t.csv"
    pd.DataFrame({"p": [f"{i:03d}.jpg" for i in range(CLASSES * PER_CLASS)],
                  "c": [caption(i, 0) for i in range(CLASSES * PER_CLASS)]}).to_csv(csv, index=False)
    return csv, tmp / "images"


def batch_entropy(table, out: Path, prep_shuffle: bool, shuffle_buffer: int, epochs=(0, 1)) -> float:
    csv, root = table
    if not out.exists():
        prep_table(input=csv, output=out, image_col="p", caption_col="c", image_root=root, shard_size=16, workers=1,
                   shuffle=prep_shuffle)
    loader = TrainLoader(out, _nothing, id_tokenizer, BATCH, seed=0, lanes=4, workers=1,
                         shuffle_buffer=shuffle_buffer)
    values = [entropy((batch.tokens[:, 0] // PER_CLASS).tolist()) for e in epochs for batch in loader.epoch(e)]
    assert len(values) == len(epochs) * (CLASSES * PER_CLASS // BATCH)
    return float(np.mean(values))


def test_sorted_table_gives_batches_as_mixed_as_a_random_permutation(sorted_table, tmp_path):
    reference = random_permutation_entropy()
    mixed = batch_entropy(sorted_table, tmp_path / "shuffled", prep_shuffle=True, shuffle_buffer=2000)
    assert abs(mixed / reference - 1) < 0.04, (mixed, reference)
    clustered = batch_entropy(sorted_table, tmp_path / "sorted", prep_shuffle=False, shuffle_buffer=0)
    assert clustered < 0.6 * reference, (clustered, reference)
    # the loader's shuffle buffer alone (over 2 shards here) already mixes within each lane
    buffered = batch_entropy(sorted_table, tmp_path / "sorted", prep_shuffle=False, shuffle_buffer=32)
    assert clustered < buffered < mixed
    print(f"class entropy per global batch (nats): random permutation {reference:.3f}, prep shuffle + loader "
          f"{mixed:.3f}, sorted + buffer 32 {buffered:.3f}, sorted without mixing {clustered:.3f}")
