"""Small generated data for the prep and loader tests: images whose colour encodes an id, so a test can check
that an image and its captions stayed together through prep and loading."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image

from clip_dro.data.shard_reader import parse_sample

LEVELS = 6  # 6 levels per channel, 40 apart: far beyond JPEG error on a flat image
MAX_ID = LEVELS ** 3


def colour_of(image_id: int) -> tuple[int, int, int]:
    """The colour of image ``image_id``; ids repeat their colour every MAX_ID (tests that read ids back from
    pixels stay below it, larger sets only need distinct files)."""
    assert image_id >= 0
    image_id %= MAX_ID
    r, g, b = image_id // (LEVELS * LEVELS), (image_id // LEVELS) % LEVELS, image_id % LEVELS
    return (20 + 40 * r, 20 + 40 * g, 20 + 40 * b)


def id_of_colour(rgb) -> int:
    r, g, b = (int(round((float(v) - 20) / 40)) for v in rgb)
    return (r * LEVELS + g) * LEVELS + b


def id_of_image(image: Image.Image) -> int:
    return id_of_colour(np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0))


def id_of_tensor(image: torch.Tensor) -> int:
    """Id of a [3, H, W] tensor in 0..1 (``to_tensor``)."""
    return id_of_colour((image.reshape(3, -1).mean(1) * 255).tolist())


def image_bytes(image_id: int, size: tuple[int, int] = (24, 16), fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour_of(image_id)).save(out, format=fmt)
    return out.getvalue()


def write_images(root: Path, ids, size: tuple[int, int] = (24, 16), fmt: str = "JPEG") -> dict[int, str]:
    """Files ``img_<id>.jpg`` (relative names) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    names = {}
    for i in ids:
        names[i] = f"img_{i:03d}.{ext}"
        (root / names[i]).write_bytes(image_bytes(i, size, fmt))
    return names


def caption(image_id: int, j: int) -> str:
    return f"item {image_id} caption {j}"


def parse_caption(text: str) -> tuple[int, int]:
    words = text.split()
    return int(words[1]), int(words[3])


def id_tokenizer(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer that keeps (image id, caption number) readable from the tokens."""
    return torch.tensor([parse_caption(t) for t in texts], dtype=torch.long)


def captions_table(tmp: Path, num_images: int, captions_per_image, size=(24, 16)) -> tuple[Path, Path]:
    """A CSV with rows interleaved across images (so grouping is exercised); returns (csv, image_root)."""
    root = tmp / "images"
    names = write_images(root, range(num_images), size)
    counts = [captions_per_image(i) if callable(captions_per_image) else captions_per_image for i in range(num_images)]
    rows = [(names[i], caption(i, j)) for j in range(max(counts)) for i in range(num_images) if j < counts[i]]
    path = tmp / "table.csv"
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(path, index=False)
    return path, root


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a tar shard, read with the standard library (independent of the code tested)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_dataset(directory: Path) -> list[dict]:
    """All samples of a prep output, in shard order: key, meta (json), captions, image (PIL), files. The tar
    is read with the standard library; the sample's members are parsed by the one sample reader
    (``shard_reader.parse_sample``) that training and evaluation use."""
    manifest = json.loads((directory / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        for key, files in read_tar(directory / shard["name"]).items():
            record = parse_sample(f"{shard['name']}: sample {key}", files)
            out.append({"key": key, "meta": record.meta, "shard": shard["name"], "captions": record.captions,
                        "image": Image.open(io.BytesIO(files[record.image_ext])), "ext": record.image_ext,
                        "files": files})
    return out


def tar_bytes(samples: list[dict[str, Optional[bytes]]]) -> bytes:
    """A tar of the samples, written with the standard library: each sample dict maps ``__key__`` to its key
    and ext -> bytes (None: file absent)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__" or data is None:
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_wds_input(path: Path, samples: list[dict[str, Optional[bytes]]]) -> None:
    """An img2dataset-style input shard (see :func:`tar_bytes`)."""
    path.write_bytes(tar_bytes(samples))
