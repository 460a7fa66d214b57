"""Evaluation sets as researchers already hold them, read as they are (no prep), into the types of
:mod:`clip_dro.data.eval_sets`; and the one place that tells the layouts apart.

* **Karpathy JSON** (retrieval; MSCOCO 5k, Flickr30K 1k): the ALBEF/BLIP per-split files (a list of records
  ``{"image": path, "caption": str | [str, ...]}``; records of one image are merged, in first-appearance
  order) and Karpathy's original ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``{"images": [{"filepath"?,
  "filename", "split", "sentences": [{"raw"}, ...]}]}``), of which one split is taken (``train`` includes
  COCO's ``restval``, as the Karpathy train split does). Image paths are relative to an image root (default:
  the JSON's directory).
* **CLIP_benchmark's webdataset layout** (retrieval or zero-shot): ``<root>/<split>/*.tar`` (``nshards.txt``
  gives their number where present: ``0.tar`` ... ``N-1.tar``) whose samples hold an image (``webp``, ``png``,
  ``jpg``, ``jpeg``) and ``.cls`` (a label) or ``.txt`` (captions, one per line), with
  ``<root>/classnames.txt`` and ``<root>/zeroshot_classification_templates.txt``.
* **CIFAR-10/100 python archives** (zero-shot), the files torchvision downloads: ``cifar-10-batches-py/``
  (``test_batch``, ``data_batch_1..5``, ``batches.meta``) or ``cifar-100-python/`` (``test``, ``train``,
  ``meta``), the directory itself or its parent. Class names from the meta file (``_`` read as a space) or a
  ``classnames.txt`` beside it; templates: CLIP's 18 CIFAR prompts or a ``templates.txt`` beside it. The
  pickles are read with an unpickler that builds only dicts, lists, strings, numbers and NumPy arrays.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from clip_dro.data.eval_sets import (CLASSNAMES_NAME, ImageRef, RetrievalSetInfo, ShardSample, ZeroShotSet,
                                     EvalSetError, check_retrieval_set, format_template, labelled_images,
                                     load_zeroshot_set, read_lines, read_shard, read_templates)
from clip_dro.manifest import MANIFEST_NAME, Location, is_url

SPLITS = ("test", "val", "train")
WDS_TEMPLATES_NAME = "zeroshot_classification_templates.txt"
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # what CLIP_benchmark's wds reader decodes

# The prompts CLIP's authors used for CIFAR-10 and CIFAR-100 (CLIP_benchmark uses the same 18).
CIFAR_TEMPLATES = [
    "a photo of a {c}.", "a blurry photo of a {c}.", "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.", "a high contrast photo of a {c}.", "a bad photo of a {c}.",
    "a good photo of a {c}.", "a photo of a small {c}.", "a photo of a big {c}.", "a photo of the {c}.",
    "a blurry photo of the {c}.", "a black and white photo of the {c}.", "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.", "a bad photo of the {c}.", "a good photo of the {c}.",
    "a photo of the small {c}.", "a photo of the big {c}.",
]


# ---------------------------------------------------------------------------------------------- dispatch


def open_retrieval_set(location: Location, image_root: Optional[Path] = None, split: str = "test"
                       ) -> RetrievalSetInfo:
    """A checked retrieval set from a prep directory (or its URL), a Karpathy JSON file (``split`` of an
    original Karpathy file; images under ``image_root``, default the file's directory) or a CLIP_benchmark
    wds directory (its ``split``)."""
    _check_split(split)
    if is_url(location):
        return check_retrieval_set(location)
    path = Path(location)
    if path.is_file() and path.suffix.lower() == ".json":
        return karpathy_retrieval_set(path, image_root or path.parent, split)
    if path.is_dir() and not (path / MANIFEST_NAME).is_file() and _wds_shards(path, split):
        return wds_retrieval_set(path, split)
    if path.is_file():
        raise EvalSetError(f"retrieval set {path}: a file, but not a Karpathy caption JSON (.json)")
    return check_retrieval_set(path)


def open_zeroshot_set(location: Location, split: str = "test") -> ZeroShotSet:
    """A checked zero-shot set from a prep directory (or its URL), an ImageFolder tree, CIFAR-10/100 python
    archives (``split`` test or train) or a CLIP_benchmark wds directory (its ``split``)."""
    _check_split(split)
    if is_url(location):
        return load_zeroshot_set(location)
    path = Path(location)
    if path.is_dir() and not (path / MANIFEST_NAME).is_file():
        cifar = _cifar_dir(path)
        if cifar is not None:
            return cifar_zeroshot_set(cifar, split)
        if _wds_shards(path, split):
            return wds_zeroshot_set(path, split)
    return load_zeroshot_set(path)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise EvalSetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


# ---------------------------------------------------------------------------------------------- Karpathy JSON


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalSetError(f"{path}: not valid JSON ({exc})") from None


def _albef_captions(path: Path, records: list) -> dict[str, list[str]]:
    """{image: captions} of a per-split file, images in first-appearance order."""
    grouped: dict[str, list[str]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record or "caption" not in record:
            raise EvalSetError(f"{path}: record {i} needs keys 'image' and 'caption'")
        caption = record["caption"]
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise EvalSetError(f"{path}: record {i}: 'caption' must be a string or a list of strings")
        grouped.setdefault(str(record["image"]), []).extend(captions)
    return grouped


def _karpathy_captions(path: Path, images: list, split: str) -> dict[str, list[str]]:
    """{filepath/filename: raw sentences} of the images of ``split`` in an original Karpathy file."""
    wanted = {"train", "restval"} if split == "train" else {split}
    grouped: dict[str, list[str]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not {"filename", "split", "sentences"} <= image.keys():
            raise EvalSetError(f"{path}: images[{i}] needs keys 'filename', 'split' and 'sentences'")
        if image["split"] not in wanted:
            continue
        sentences = image["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                      for s in sentences):
            raise EvalSetError(f"{path}: images[{i}]: 'sentences' must be a list of objects with a 'raw' string")
        name = str(Path(image.get("filepath") or "") / image["filename"])
        grouped.setdefault(name, []).extend(s["raw"] for s in sentences)
    return grouped


def karpathy_retrieval_set(path: Path, image_root: Path, split: str = "test") -> RetrievalSetInfo:
    """A retrieval set from a Karpathy JSON of either shape (see the module docstring). Every image file
    must exist under ``image_root``; an image with no caption is an error naming it."""
    data = _load_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        grouped, name = _karpathy_captions(path, data["images"], split), f"{path.stem}_{split}"
    elif isinstance(data, list):
        grouped, name = _albef_captions(path, data), path.stem
    else:
        raise EvalSetError(f"{path}: neither a list of records with 'image' and 'caption' (ALBEF/BLIP per-split "
                           "file) nor an object with 'images' (Karpathy's dataset_coco.json / dataset_flickr30k.json)")
    if not grouped:
        raise EvalSetError(f"{path} holds no images" + (f" in split {split!r}" if isinstance(data, dict) else ""))
    if not image_root.is_dir():
        raise EvalSetError(f"--image-root {image_root} (images of {path}) is not a directory")
    missing = [image for image in grouped if not (image_root / image).is_file()]
    if missing:
        raise EvalSetError(f"{path}: {len(missing)} of {len(grouped)} images are not under --image-root "
                           f"{image_root}, e.g. {image_root / missing[0]}")
    empty = next((image for image, captions in grouped.items() if not captions), None)
    if empty is not None:
        raise EvalSetError(f"{path}: image {empty} has no caption")
    images = [ImageRef(str(image_root / image), image_root / image) for image in grouped]
    return RetrievalSetInfo(name, path, images, list(grouped.values()))


# ---------------------------------------------------------------------------------------------- CLIP_benchmark wds


def _wds_shards(root: Path, split: str) -> list[Path]:
    """The tar shards of ``<root>/<split>/``, in CLIP_benchmark's order (``0.tar`` ... per ``nshards.txt``,
    else every ``.tar`` in natural order)."""
    directory = root / split
    if not directory.is_dir():
        return []
    count_file = directory / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text().strip()
        if not text.isdigit():
            raise EvalSetError(f"{count_file}: expected the number of shards, got {text[:40]!r}")
        count = int(text)
        # Checked one by one and stopped at the first gap: a foreign count of 10**12 costs one lookup.
        for i in range(count):
            if not (directory / f"{i}.tar").is_file():
                raise EvalSetError(f"{count_file} lists {count} shards but {directory / f'{i}.tar'} does not exist")
        return [directory / f"{i}.tar" for i in range(count)]
    return sorted(directory.glob("*.tar"), key=lambda p: [int(t) if t.isdigit() else t
                                                         for t in re.split(r"(\d+)", p.name)])


def _wds_samples(root: Path, split: str, read: set[str]) -> list[ShardSample]:
    samples = [sample for shard in _wds_shards(root, split) for sample in read_shard(shard, read)]
    if not samples:
        raise EvalSetError(f"{root / split} holds no samples")
    for sample in samples:
        if not any(ext in sample.members for ext in WDS_IMAGE_EXTENSIONS):
            raise EvalSetError(f"{sample.where} has no image (.{', .'.join(WDS_IMAGE_EXTENSIONS)})")
    return samples


def _wds_type(root: Path) -> str:
    path = root / "dataset_type.txt"
    return path.read_text().strip().lower() if path.is_file() else "classification"


def wds_retrieval_set(root: Path, split: str = "test") -> RetrievalSetInfo:
    """A retrieval set in CLIP_benchmark's wds layout: each sample an image and its captions (``.txt``)."""
    samples = _wds_samples(root, split, {"txt"})
    captions = []
    for sample in samples:
        raw = sample.data.get("txt")
        lines = [] if raw is None else raw.decode("utf-8", errors="replace").splitlines()
        if not lines:
            raise EvalSetError(f"{sample.where} has no captions (.txt): a retrieval sample needs at least one")
        captions.append(lines)
    return RetrievalSetInfo(root.name, root, [s.image for s in samples], captions)


def wds_zeroshot_set(root: Path, split: str = "test") -> ZeroShotSet:
    """A zero-shot set in CLIP_benchmark's wds layout: each sample an image and its label (``.cls``)."""
    kind = _wds_type(root)
    if kind != "classification":
        raise EvalSetError(f"zero-shot set {root}: dataset_type.txt says {kind!r}; only single-label "
                           "classification sets are zero-shot sets (a retrieval set goes to --retrieval)")
    classnames_path = root / CLASSNAMES_NAME
    if not classnames_path.is_file():
        raise EvalSetError(f"zero-shot set {root} has no {CLASSNAMES_NAME} (one class name per line, in label order)")
    classnames = read_lines(classnames_path)
    templates = read_templates(root, name=WDS_TEMPLATES_NAME)
    images, labels = labelled_images(_wds_samples(root, split, {"cls"}), len(classnames), classnames_path)
    return ZeroShotSet(root.name, root, classnames, templates, images, labels, "clip_benchmark_wds")


# ---------------------------------------------------------------------------------------------- CIFAR


# name: (archive folder, files per split, label key, meta file, class-name key)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]},
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", {"test": ["test"], "train": ["train"]}, "fine_labels", "meta",
                 "fine_label_names"),
}
# The globals a CIFAR pickle needs to rebuild its NumPy arrays, and nothing else (``_codecs.encode`` turns a
# string into bytes: how protocol 2 stores bytes written by Python 3).
_SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR archive holds only arrays, "
                                         "lists and strings")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as stream:
            data = _ArraysOnly(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise EvalSetError(f"{path}: not a CIFAR python archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise EvalSetError(f"{path}: not a CIFAR python archive (expected a dict)")
    return data


def _cifar_dir(path: Path) -> Optional[tuple[str, Path]]:
    """(kind, archive folder) when ``path`` is a CIFAR archive folder or the parent of exactly one."""
    found = [(kind, folder) for kind, (name, *_rest) in _CIFAR.items()
             for folder in (path, path / name) if folder.name == name and folder.is_dir()]
    if len(found) > 1:
        raise EvalSetError(f"zero-shot set {path} holds both CIFAR-10 and CIFAR-100; name the archive folder")
    return found[0] if found else None


def cifar_zeroshot_set(cifar: tuple[str, Path], split: str = "test") -> ZeroShotSet:
    """A zero-shot set from the CIFAR-10/100 python archive folder ``cifar`` = (kind, folder)."""
    kind, folder = cifar
    _, files, label_key, meta_name, names_key = _CIFAR[kind]
    if split not in files:
        raise EvalSetError(f"--split {split}: CIFAR has only the test and train splits")
    for name in files[split] + [meta_name]:
        if not (folder / name).is_file():
            raise EvalSetError(f"CIFAR archive {folder} lacks {name}")
    custom = folder / CLASSNAMES_NAME
    if custom.is_file():
        classnames = read_lines(custom)
    else:
        meta = _unpickle(folder / meta_name)
        if not isinstance(meta.get(names_key), list):
            raise EvalSetError(f"{folder / meta_name}: no {names_key!r} list of class names")
        classnames = [str(n).replace("_", " ") for n in meta[names_key]]
    images, labels = [], []
    for name in files[split]:
        batch = _unpickle(folder / name)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise EvalSetError(f"{folder / name}: 'data' is not a uint8 array of 32 x 32 x 3 images per row")
        if not isinstance(batch_labels, list) or len(batch_labels) != len(data):
            raise EvalSetError(f"{folder / name}: {label_key!r} is not a list of one label per image")
        bad = next((x for x in batch_labels if not isinstance(x, int) or not 0 <= x < len(classnames)), None)
        if bad is not None:
            raise EvalSetError(f"{folder / name}: label {bad!r} is not one of the {len(classnames)} classes")
        # Rows are channel-major (1024 red, green, blue values); torchvision reads them the same way.
        pixels = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        images += [ImageRef(f"{folder / name}: image {i}", folder / name, pixels=pixels[i]) for i in range(len(data))]
        labels += batch_labels
    templates = read_templates(folder, default=[format_template(t) for t in CIFAR_TEMPLATES])
    return ZeroShotSet(kind if split == "test" else f"{kind}_{split}", folder, classnames, templates, images, labels,
                       "cifar")
