"""Tiny evaluation fixtures (prep-style shard sets written with webdataset's TarWriter and a Manifest,
ImageFolder trees, checkpoint directories, training sets recording concepts, images that cannot be decoded)
and brute-force reference metrics written independently of ``clip_dro.evaluation``.

The set writers take ``replace``: {position: bytes} writes those bytes in place of that image (a bad image),
{position: None} leaves that sample out, everything else unchanged; so a set with a bad image and the same
set without it come from one call each."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from clip_dro.config import Config, save_config
from clip_dro.manifest import Manifest, ShardInfo
from clip_dro.models import build_model

WORDS = ["red", "blue", "green", "circle", "square", "small", "large", "striped", "dotted", "left", "right"]


def image(rng: np.random.Generator, size: int = 24) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def caption(rng: np.random.Generator) -> str:
    return "a " + " ".join(rng.choice(WORDS, size=3))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def truncated_png(seed: int = 0) -> bytes:
    """The first half of a valid PNG: PIL identifies it and fails while decoding."""
    data = png_bytes(image(np.random.default_rng(seed)))
    return data[:len(data) // 2]


def bomb_png(side: int = 30000) -> bytes:
    """A PNG of 1 x 1 pixels whose header claims ``side`` x ``side``: with the default side, more than twice
    PIL's MAX_IMAGE_PIXELS, so that ``Image.open`` raises DecompressionBombError (a few dozen bytes)."""
    data = bytearray(png_bytes(Image.new("1", (1, 1))))
    # IHDR is the first chunk: length (4), type (4), width and height (4 + 4) at 16, then its CRC at 29.
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _replaced(samples: list[dict[str, Any]], ext: str, replace: dict[int, Optional[bytes]]) -> list[dict[str, Any]]:
    """``samples`` with the ``ext`` image of each position in ``replace`` swapped for its bytes, or the sample
    left out where they are None."""
    out = []
    for i, sample in enumerate(samples):
        if i not in replace:
            out.append(sample)
        elif replace[i] is not None:
            out.append({**sample, ext: replace[i]})
    return out


def write_shards(directory: Path, samples: list[dict[str, Any]], shard_size: int, kind: str,
                 num_images: Optional[int] = None, num_texts: Optional[int] = None) -> Manifest:
    """Write ``samples`` (webdataset dicts without ``__key__``) as shards of ``shard_size`` plus a manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, len(samples), shard_size):
        name = f"shard-{first // shard_size:05d}.tar"
        chunk = samples[first:first + shard_size]
        with wds.TarWriter(str(directory / name)) as sink:
            for i, sample in enumerate(chunk):
                sink.write({"__key__": f"{first + i:09d}", **sample})
        shards.append(ShardInfo(name, len(chunk), first))
    manifest = Manifest(num_samples=len(samples), num_images=num_images or len(samples),
                        num_texts=num_texts or 0, shards=shards, source={"kind": "test"},
                        accepted=len(samples), rejected=0, kind=kind)
    manifest.write(directory)
    return manifest


def make_retrieval_set(directory: Path, num_images: int = 10, shard_size: int = 4, seed: int = 0,
                       ext: str = "png", replace: Optional[dict[int, Optional[bytes]]] = None) -> list[list[str]]:
    """A retrieval set with 1-4 captions per image; returns the captions per written image in order."""
    rng = np.random.default_rng(seed)
    samples, text = [], 0
    for i in range(num_images):
        captions = [caption(rng) for _ in range(int(rng.integers(1, 5)))]
        meta = {"index": i, "image_index": i, "text_index": list(range(text, text + len(captions)))}
        samples.append({ext: image(rng), "txt": "\n".join(captions), "json": meta})
        text += len(captions)
    samples = _replaced(samples, ext, replace or {})
    write_shards(directory, samples, shard_size, "retrieval",
                 num_texts=sum(len(s["json"]["text_index"]) for s in samples))
    return [s["txt"].split("\n") for s in samples]


def make_zeroshot_shards(directory: Path, classnames: list[str], per_class: int = 3, shard_size: int = 5,
                         seed: int = 0, templates: Optional[list[str]] = None,
                         replace: Optional[dict[int, Optional[bytes]]] = None) -> list[int]:
    """A zero-shot set as prep shards with ``.cls`` labels; returns the labels of the written samples in order."""
    rng = np.random.default_rng(seed)
    labels = [int(c) for c in rng.permutation(np.repeat(np.arange(len(classnames)), per_class))]
    samples = [{"jpg": image(rng), "cls": label, "json": {"index": i, "image_index": i, "text_index": []}}
               for i, label in enumerate(labels)]
    samples = _replaced(samples, "jpg", replace or {})
    write_shards(directory, samples, shard_size, "zeroshot")
    (directory / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (directory / "templates.txt").write_text("\n".join(templates) + "\n")
    return [s["cls"] for s in samples]


def make_imagefolder(directory: Path, folders: list[str], per_class: int = 3, seed: int = 0,
                     classnames: Optional[list[str]] = None,
                     replace: Optional[dict[int, Optional[bytes]]] = None) -> None:
    """Files ``folder/img{i}.png``; ``replace`` counts positions over all files, folder by folder."""
    rng = np.random.default_rng(seed)
    files = [(directory / folder / f"img{i}.png", png_bytes(image(rng)))
             for folder in folders for i in range(per_class)]
    for folder in folders:
        (directory / folder).mkdir(parents=True)
    for sample in _replaced([{"path": path, "png": data} for path, data in files], "png", replace or {}):
        sample["path"].write_bytes(sample["png"])
    if classnames is not None:
        (directory / "classnames.txt").write_text("\n".join(classnames) + "\n")


def make_train_set(directory: Path, frequencies: dict[str, float], captions_per_image: int = 2,
                   seed: int = 0) -> list[dict[str, Any]]:
    """A training set whose samples record ``concept`` and ``concept_frequency``; each concept gets
    ``max(1, round(20 * frequency))`` images. Returns the sample records."""
    rng = np.random.default_rng(seed)
    samples, metas, text = [], [], 0
    for concept, frequency in frequencies.items():
        for _ in range(max(1, round(20 * frequency))):
            i = len(samples)
            meta = {"index": i, "image_index": i, "text_index": list(range(text, text + captions_per_image)),
                    "concept": concept, "concept_count": round(20 * frequency), "concept_frequency": frequency}
            text += captions_per_image
            samples.append({"png": image(rng, 4), "txt": "\n".join([concept] * captions_per_image), "json": meta})
            metas.append(meta)
    write_shards(directory, samples, 7, "train", num_texts=text)
    return metas


def make_checkpoint(directory: Path, model_name: str = "tiny-vit", seed: int = 0,
                    cfg: Optional[Config] = None) -> Path:
    """A checkpoint directory as the trainer writes it: ``model.pt`` (open_clip state dict) and ``config.yaml``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    bundle = build_model(model_name)
    torch.save(bundle.model.state_dict(), directory / "model.pt")
    cfg = cfg or Config()
    cfg.model.name = model_name
    save_config(cfg, directory / "config.yaml")
    return directory


# ------------------------------------------------------------------ sets with bad images (conftest.bad_sets)

TEMPLATES = ["a photo of a {c}.", "a {c} drawn in pencil"]
CLASSES = ["cat", "dog", "bird", "fish", "horse", "cow"]
FRUITS = ["apple", "banana", "cherry"]
# Each set's bad images by position, in the middle of a batch of 4 and at the start of one.
BAD = {"coco_test": {5: bomb_png(), 8: truncated_png()}, "zs_shards": {3: b"not an image"},
       "zs_folder": {3: truncated_png(1)}}


def write_eval_sets(root: Path, replace: dict[str, dict]) -> Path:
    """A retrieval set (``coco_test``), zero-shot shards (``zs_shards``) and an ImageFolder (``zs_folder``),
    each with ``replace``'s images (see the module's docstring)."""
    make_retrieval_set(root / "coco_test", num_images=11, shard_size=4, seed=1, replace=replace["coco_test"])
    make_zeroshot_shards(root / "zs_shards", CLASSES, per_class=2, shard_size=5, templates=TEMPLATES,
                         replace=replace["zs_shards"])
    make_imagefolder(root / "zs_folder", FRUITS, per_class=3, replace=replace["zs_folder"])
    (root / "zs_folder" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")  # fewer prompts: faster
    return root


def eval_set_args(root: Path) -> list[str]:
    """The ``clip-dro eval`` options naming :func:`write_eval_sets`'s sets."""
    return ["--retrieval", str(root / "coco_test"), "--zeroshot", str(root / "zs_shards"), str(root / "zs_folder")]


# ------------------------------------------------------------------------------- reference metrics


def _top_k(scores: list[float], k: int) -> list[int]:
    """The documented order: descending score, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]


def brute_force_retrieval(images: torch.Tensor, texts: torch.Tensor, text_to_image: list[int]) -> dict[str, float]:
    sim = (images @ texts.T).tolist()
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_R@{k}"] = 100 * sum(any(text_to_image[j] == i for j in _top_k(row, k))
                                      for i, row in enumerate(sim)) / len(sim)
    sim_t = (texts @ images.T).tolist()
    for k in (1, 5, 10):
        out[f"t2i_R@{k}"] = 100 * sum(text_to_image[t] in _top_k(row, k) for t, row in enumerate(sim_t)) / len(sim_t)
    out["r_mean"] = sum(out.values()) / 6
    return out


def brute_force_classification(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    rows, y = logits.tolist(), labels.tolist()
    top1 = [_top_k(r, 1)[0] for r in rows]
    out = {"acc1": 100 * sum(p == t for p, t in zip(top1, y)) / len(y)}
    if logits.shape[1] >= 5:
        out["acc5"] = 100 * sum(t in _top_k(r, 5) for r, t in zip(rows, y)) / len(y)
    recalls = [sum(p == c for p, t in zip(top1, y) if t == c) / y.count(c) for c in sorted(set(y))]
    out["mean_per_class_recall"] = 100 * sum(recalls) / len(recalls)
    return out
