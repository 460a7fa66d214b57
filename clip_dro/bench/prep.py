"""Benchmark case "prep": ``prep csv`` against the same PIL decode + shrink + encode in a plain loop."""
from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_prep.images import JPEG_QUALITY, RESAMPLE, shorter_side_size
from data_prep.tabular import prep_table


def _photo_like(rng: np.random.Generator, px: int) -> Image.Image:
    """A smooth random colour field with detail, so JPEG decoding costs what a photo costs."""
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((px * 4 // 3, px), Image.Resampling.BICUBIC), dtype=np.int16)
    detail = rng.integers(-20, 21, size=image.shape, dtype=np.int16)
    return Image.fromarray(np.clip(image + detail, 0, 255).astype(np.uint8))


def write_images(directory: Path, num_images: int, px: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(num_images):
        path = directory / f"{i:06d}.jpg"
        _photo_like(rng, px).save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def pil_alone(paths: list[Path], image_size: int, draft: bool = True) -> None:
    """The baseline: the same PIL operations prep performs per image (open, draft, decode, shrink, encode);
    ``draft=False`` is the naive loop that decodes at full size."""
    for path in paths:
        image = Image.open(path)
        target = shorter_side_size(image.width, image.height, image_size)
        if draft:
            image.draft("RGB", target)
        image = image.convert("RGB").resize(target, RESAMPLE)
        image.save(io.BytesIO(), format="JPEG", quality=JPEG_QUALITY)


def bench_prep(num_images: int = 2000, workers: int = 1, image_px: int = 256, image_size: int = 64,
               repeats: int = 2) -> dict:
    """Time prep of a CSV of ``num_images`` generated ``image_px`` JPEGs shrunk to ``image_size`` with
    ``workers`` processes, and the PIL-alone loop in one process (best of ``repeats`` each); the ratio is per
    core (ours x workers / PIL). ``naive_pil_s`` is the same loop without JPEG draft decoding."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root, num_images, image_px)
        table = root / "table.csv"
        pd.DataFrame({"filepath": [p.name for p in paths], "caption": [f"image {i}" for i in range(num_images)]}
                     ).to_csv(table, index=False)
        baseline, naive, ours = [], [], []
        for repeat in range(repeats):  # interleaved, best of each: the machine is shared
            start = time.perf_counter()
            pil_alone(paths, image_size)
            baseline.append(time.perf_counter() - start)
            start = time.perf_counter()
            pil_alone(paths, image_size, draft=False)
            naive.append(time.perf_counter() - start)
            start = time.perf_counter()
            prep_table(input=table, output=root / f"out{repeat}", image_col="filepath", caption_col="caption",
                       image_root=root, shard_size=1000, image_size=image_size, workers=workers)
            ours.append(time.perf_counter() - start)
        baseline_s, ours_s = min(baseline), min(ours)
    return {"case": "prep", "images": num_images, "image_px": image_px, "image_size": image_size,
            "workers": workers, "ours_s": ours_s, "baseline_s": baseline_s, "ratio": ours_s * workers / baseline_s,
            "images_per_s": num_images / ours_s, "naive_pil_s": min(naive),
            "ratio_vs_naive_pil": ours_s * workers / min(naive)}
