"""Miniature stand-ins of the evaluation sets researchers download, written in their published layouts:
Karpathy's caption JSON in both shapes, CIFAR python archives, and CLIP_benchmark's webdataset sets (written by
CLIP_benchmark's own ``webdataset_builder``)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["red", "blue", "green", "circle", "square", "small", "large", "striped", "dotted", "left", "right"]


def picture(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def captions_of(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(1000 + seed)
    return [f"a {' '.join(rng.choice(WORDS, size=3))} number {seed}.{j}" for j in range(count)]


def write_karpathy_original(path: Path, image_root: Path, splits: list[str], with_filepath: bool = True,
                            captions_per_image: int = 5) -> list[dict]:
    """``dataset_coco.json`` (``filepath`` set) or ``dataset_flickr30k.json`` (no ``filepath``) over images
    written under ``image_root``; image i gets ``splits[i]``. Returns the ``images`` records."""
    images = []
    for i, split in enumerate(splits):
        folder = ("val2014" if split != "train" else "train2014") if with_filepath else ""
        filename = f"img_{i:04d}.png"
        (image_root / folder).mkdir(parents=True, exist_ok=True)
        picture(i).save(image_root / folder / filename)
        record = {"filename": filename, "imgid": i, "split": split,
                  "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 5 * i + j}
                                for j, c in enumerate(captions_of(i, captions_per_image))]}
        if with_filepath:
            record["filepath"] = folder
        images.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "coco" if with_filepath else "flickr30k"}))
    return images


def write_cifar(directory: Path, kind: str = "cifar10", per_split: int = 20, seed: int = 0) -> dict[str, tuple]:
    """``cifar-10-batches-py/`` or ``cifar-100-python/`` under ``directory``, pickled as the originals are
    (protocol 2 dicts holding a uint8 ``data`` array of channel-major rows and a list of labels). Returns
    {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, files, label_key = directory / "cifar-10-batches-py", ["test_batch"] + [
            f"data_batch_{i}" for i in range(1, 6)], "labels"
        meta_name, meta = "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                            "frog", "horse", "ship", "truck"],
                                            "num_cases_per_batch": per_split, "num_vis": 3072}
    else:
        folder, files, label_key = directory / "cifar-100-python", ["test", "train"], "fine_labels"
        meta_name, meta = "meta", {"fine_label_names": [f"thing_{i}" for i in range(99)] + ["aquarium_fish"],
                                   "coarse_label_names": [f"group_{i}" for i in range(20)]}
    folder.mkdir(parents=True)
    written = {}
    classes = len(meta.get("label_names") or meta["fine_label_names"])
    for name in files:
        data = rng.integers(0, 256, (per_split, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, per_split)]
        batch = {"batch_label": f"{name} of 1", label_key: labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(per_split)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    (folder / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    return written


class ClassificationSet(torch.utils.data.Dataset):
    """(PIL image, label) with ``.classes`` and ``.templates``: what CLIP_benchmark's converter takes."""

    def __init__(self, classes: list[str], per_class: int, templates: list[str], seed: int = 0):
        self.classes, self.templates = classes, templates
        self.labels = [c for c in range(len(classes)) for _ in range(per_class)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return picture(self.seed + i), self.labels[i]


class CaptionSet(torch.utils.data.Dataset):
    """(PIL image, [captions]) for CLIP_benchmark's retrieval converter."""

    def __init__(self, num_images: int, captions_per_image: int = 5, seed: int = 0):
        self.num_images, self.captions_per_image, self.seed = num_images, captions_per_image, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int):
        return picture(self.seed + i), captions_of(self.seed + i, self.captions_per_image)


def write_wds_classification(directory: Path, classes: list[str], per_class: int, templates: list[str],
                             max_count: int = 7, seed: int = 0) -> ClassificationSet:
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    dataset = ClassificationSet(classes, per_class, templates, seed)
    convert_dataset(dataset, "test", str(directory), transform=PIL_to_bytes("webp"), max_count=max_count,
                    verbose=False)
    return dataset


def write_wds_retrieval(directory: Path, num_images: int, captions_per_image: int = 5, max_count: int = 7,
                        seed: int = 0) -> CaptionSet:
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_retrieval_dataset

    dataset = CaptionSet(num_images, captions_per_image, seed)
    convert_retrieval_dataset(dataset, "test", str(directory), transform=PIL_to_bytes("webp"), max_count=max_count,
                              verbose=False)
    return dataset


def write_readme_standins(data: Path, weights: Path) -> None:
    """What the README's "Benchmark a model" commands name: Karpathy's dataset_coco.json and
    dataset_flickr30k.json with their images, a CIFAR-10 archive, CLIP_benchmark wds sets, and weights at
    ``weights/ViT-B-32.pt`` and ``weights/RN50.pt`` (the README test runs the commands with tiny-vit in the
    place of both, other weights in each)."""
    from clip_dro.models import build_model

    splits = ["test", "val", "train", "restval"] * 3
    write_karpathy_original(data / "coco" / "dataset_coco.json", data / "coco", splits)
    write_karpathy_original(data / "flickr30k" / "dataset_flickr30k.json", data / "flickr30k" / "flickr30k-images",
                            splits, with_filepath=False)
    write_cifar(data / "cifar10", "cifar10", per_split=30)
    write_wds_retrieval(data / "wds_mscoco_captions", num_images=10)
    write_wds_classification(data / "wds_cifar10", ["airplane", "bird", "cat", "dog", "ship", "truck"], per_class=3,
                             templates=["a photo of a {c}.", "a blurry photo of a {c}.", "a photo of the big {c}."])
    weights.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("ViT-B-32.pt", "RN50.pt")):
        torch.manual_seed(seed)
        torch.save(build_model("tiny-vit").model.state_dict(), weights / name)
