"""Reading evaluation sets (SPEC 5), checked before anything is encoded.

* A retrieval set is a prep output directory: every sample is one image with all its captions.
* A zero-shot set is a directory with ``classnames.txt`` (one name per line, in label order), optionally
  ``templates.txt`` (one prompt per line with a ``{c}`` placeholder; default: open_clip's OpenAI ImageNet
  templates) and either prep shards whose samples carry a ``.cls`` label or one sub-folder of images per
  class (the torchvision ImageFolder / ImageNet-val layout, sorted folder names giving the label order).
  For the ImageFolder layout ``classnames.txt`` is optional: without it the folder names are the class names,
  except for exactly 1000 WordNet-id folders (``n01440764`` ...), which get open_clip's ImageNet class names.

The ``check_*`` / ``load_*`` functions read only the small members of the shards (``.json``, ``.txt``,
``.cls``): tarfile seeks over the images, so validating a set costs little next to encoding it. They note
where each image is (:class:`ImageRef`); :func:`iter_image_batches` then decodes the images in order, in
DataLoader workers if asked, and hands back an image that cannot be decoded as a :class:`BadImage` instead of
failing, so that the caller decides whether one bad file ends an evaluation.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import open_clip
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from clip_dro.errors import UserError
from clip_dro.manifest import IMAGE_EXTENSIONS, MANIFEST_NAME, Manifest, load_manifest

CLASSNAMES_NAME = "classnames.txt"
TEMPLATES_NAME = "templates.txt"
_WORDNET_ID = re.compile(r"n\d{8}")
_TAR_BLOCK = 512

Template = Callable[[str], str]


class EvalSetError(UserError):
    """An evaluation set that cannot be read; the message names the directory, file, shard or sample."""


@dataclass
class ShardSample:
    """One sample of a shard as seen by a scan: the extensions it holds and the bytes of the small ones."""

    shard: Path
    key: str
    extensions: set[str]
    data: dict[str, bytes]

    @property
    def where(self) -> str:
        return f"{self.shard}: sample {self.key}"


def require_dir(directory: str | Path, what: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalSetError(f"{what} {directory} does not exist or is not a directory")
    return directory


def scan_shards(directory: Path, manifest: Manifest, read: set[str]) -> Iterator[ShardSample]:
    """Every sample of the shards, in manifest order, with the bytes of the members whose extension is in
    ``read``. Samples are grouped by key the way webdataset groups them (``base_plus_ext``)."""
    for shard in manifest.shard_paths(directory):
        try:
            with tarfile.open(shard) as tar:
                current: Optional[ShardSample] = None
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    ext = ext.lower()
                    if current is None or current.key != key:
                        if current is not None:
                            yield current
                        current = ShardSample(shard, key, set(), {})
                    current.extensions.add(ext)
                    if ext in read:
                        current.data[ext] = tar.extractfile(member).read()
                if current is not None:
                    yield current
        except tarfile.TarError as exc:
            raise EvalSetError(f"{shard}: not a readable tar shard ({exc})") from None


def iter_sample_json(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The ``.json`` record of every sample of a prep directory, in manifest order, without reading images."""
    directory = require_dir(directory, "prep directory")
    for sample in scan_shards(directory, load_manifest(directory), {"json"}):
        yield _parse_json(sample.where, sample.data.get("json"))


def _parse_json(where: str, raw: Optional[bytes]) -> dict[str, Any]:
    if raw is None:
        raise EvalSetError(f"{where} has no .json member")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalSetError(f"{where}: .json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise EvalSetError(f"{where}: .json is not an object")
    return meta


# ---------------------------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalSetInfo:
    name: str
    directory: Path
    num_samples: int
    num_texts: int


def _has_image(extensions: set[str] | Any) -> bool:
    return any(ext in extensions for ext in IMAGE_EXTENSIONS)


def parse_retrieval_sample(where: str, has_image: bool, text: Optional[str],
                           meta: Any) -> tuple[list[str], int, list[int]]:
    """(captions, image_index, text_index) of one retrieval sample, or an error naming the sample."""
    if not isinstance(meta, dict):
        raise EvalSetError(f"{where} has no .json object with its indices")
    if not has_image:
        raise EvalSetError(f"{where} has no image (.{', .'.join(IMAGE_EXTENSIONS)})")
    captions = text.splitlines() if text is not None else []
    if not captions:
        raise EvalSetError(f"{where} has no captions (empty or missing .txt): a retrieval set needs at least "
                           "one caption per image")
    image_index = meta.get("image_index")
    text_index = meta.get("text_index")
    if not isinstance(image_index, int) or isinstance(image_index, bool):
        raise EvalSetError(f"{where}: .json key 'image_index' should be an integer, got {image_index!r}")
    if not isinstance(text_index, list) or not all(isinstance(t, int) for t in text_index):
        raise EvalSetError(f"{where}: .json key 'text_index' should be a list of integers, got {text_index!r}")
    if len(text_index) != len(captions):
        raise EvalSetError(f"{where}: {len(captions)} caption lines in .txt but {len(text_index)} entries in "
                           ".json 'text_index'")
    return captions, image_index, text_index


def check_retrieval_set(directory: str | Path) -> RetrievalSetInfo:
    """Check every sample of a retrieval set (an image, captions, indices, each image once) without decoding
    images."""
    directory = require_dir(directory, "retrieval set")
    manifest = load_manifest(directory)
    if manifest.num_samples == 0:
        raise EvalSetError(f"retrieval set {directory} holds no samples")
    num_samples = num_texts = 0
    seen_images: set[int] = set()
    for sample in scan_shards(directory, manifest, {"txt", "json"}):
        try:
            text = sample.data["txt"].decode("utf-8") if "txt" in sample.data else None
        except UnicodeDecodeError:
            raise EvalSetError(f"{sample.where}: .txt is not UTF-8 text") from None
        captions, image_index, _ = parse_retrieval_sample(sample.where, _has_image(sample.extensions), text,
                                                          _parse_json(sample.where, sample.data.get("json")))
        if image_index in seen_images:
            raise EvalSetError(f"{sample.where}: image_index {image_index} appears in an earlier sample; a "
                               "retrieval set holds each image once, with all its captions")
        seen_images.add(image_index)
        num_samples += 1
        num_texts += len(captions)
    if num_samples != manifest.num_samples:
        raise EvalSetError(f"{directory / MANIFEST_NAME}: lists {manifest.num_samples} samples but the shards "
                           f"hold {num_samples}")
    return RetrievalSetInfo(directory.name, directory, num_samples, num_texts)


def _webdataset(paths: list[Path]) -> wds.WebDataset:
    # Evaluation reads every shard in this one process, whatever the rank: no node or worker splitting.
    return wds.WebDataset([str(p) for p in paths], shardshuffle=False, nodesplitter=None,
                          workersplitter=None, empty_check=False).decode("pilrgb")


def _image_of(sample: dict[str, Any]) -> Any:
    return next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)


RetrievalBatch = tuple[torch.Tensor, list[list[str]], list[int], list[list[int]]]


def iter_retrieval_batches(directory: str | Path, preprocess: Callable,
                           batch_size: int) -> Iterator[RetrievalBatch]:
    """Batches ``(images, captions, image_index, text_index)`` of a retrieval set in manifest order:
    ``images`` a tensor of preprocessed images, and per image its captions, its global image index and the
    global text index of each caption."""
    directory = require_dir(directory, "retrieval set")
    manifest = load_manifest(directory)

    def to_record(sample: dict[str, Any]) -> tuple[torch.Tensor, list[str], int, list[int]]:
        where = f"{sample['__url__']}: sample {sample['__key__']}"
        captions, image_index, text_index = parse_retrieval_sample(
            where, _has_image(sample), sample.get("txt"), sample.get("json"))
        return preprocess(_image_of(sample)), captions, image_index, text_index

    def collate(records: list[tuple]) -> RetrievalBatch:
        images, captions, image_index, text_index = zip(*records)
        return torch.stack(images), list(captions), list(image_index), list(text_index)

    pipeline = _webdataset(manifest.shard_paths(directory)).map(to_record).batched(
        batch_size, collation_fn=collate, partial=True)
    yield from pipeline


# ---------------------------------------------------------------------------------------------- zero-shot


@dataclass
class ZeroShotSet:
    """A zero-shot classification set: class names in label order, prompt templates, and its images."""

    name: str
    directory: Path
    classnames: list[str]
    templates: list[Template]
    num_samples: int
    layout: str  # "shards" or "imagefolder"

    def batches(self, preprocess: Callable, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` batches in a fixed order (manifest order, or ImageFolder's sorted order)."""
        if self.layout == "imagefolder":
            dataset = torchvision.datasets.ImageFolder(str(self.directory), transform=preprocess)
            yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
            return
        manifest = load_manifest(self.directory)

        def collate(records: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = zip(*records)
            return torch.stack(images), torch.tensor(labels, dtype=torch.long)

        pipeline = (_webdataset(manifest.shard_paths(self.directory))
                    .map(lambda s: (preprocess(_image_of(s)), int(s["cls"])))
                    .batched(batch_size, collation_fn=collate, partial=True))
        yield from pipeline


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file; an empty line between names is an error naming the line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise EvalSetError(f"{path} line {number} is empty")
    if not lines:
        raise EvalSetError(f"{path} is empty")
    return [line.strip() for line in lines]


def _format_template(template: str) -> Template:
    return lambda c: template.replace("{c}", c)


def read_templates(directory: Path) -> list[Template]:
    """``templates.txt`` as callables (the form open_clip's zero-shot builder takes), or the default."""
    path = directory / TEMPLATES_NAME
    if not path.is_file():
        return list(open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    lines = _read_lines(path)
    for number, line in enumerate(lines, start=1):
        if "{c}" not in line:
            raise EvalSetError(f"{path} line {number} has no {{c}} placeholder for the class name: {line!r}")
    return [_format_template(line) for line in lines]


def _shard_labels(directory: Path, manifest: Manifest, num_classes: int, classnames_path: Path) -> int:
    count = 0
    for sample in scan_shards(directory, manifest, {"cls"}):
        if not _has_image(sample.extensions):
            raise EvalSetError(f"{sample.where} has no image (.{', .'.join(IMAGE_EXTENSIONS)})")
        if "cls" not in sample.data:
            raise EvalSetError(f"{sample.where} has no .cls label: a zero-shot set's samples need one")
        try:
            label = int(sample.data["cls"].decode("utf-8").strip())
        except ValueError:
            raise EvalSetError(f"{sample.where}: .cls {sample.data['cls']!r} is not an integer label") from None
        if not 0 <= label < num_classes:
            raise EvalSetError(f"{sample.where} has label {label} but {classnames_path} has {num_classes} class "
                               f"names (labels 0..{num_classes - 1})")
        count += 1
    return count


def _imagefolder_classnames(directory: Path, folders: list[str]) -> list[str]:
    path = directory / CLASSNAMES_NAME
    if path.is_file():
        classnames = _read_lines(path)
        if len(classnames) != len(folders):
            raise EvalSetError(f"{path} has {len(classnames)} class names but {directory} has {len(folders)} "
                               "class sub-folders")
        return classnames
    imagenet = open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES
    if len(folders) == len(imagenet) and all(_WORDNET_ID.fullmatch(f) for f in folders):
        return list(imagenet)
    return folders


def load_zeroshot_set(directory: str | Path) -> ZeroShotSet:
    """Read and check a zero-shot set's class names, templates and labels (images are not decoded)."""
    directory = require_dir(directory, "zero-shot set")
    templates = read_templates(directory)
    if (directory / MANIFEST_NAME).is_file():
        classnames_path = directory / CLASSNAMES_NAME
        if not classnames_path.is_file():
            raise EvalSetError(f"zero-shot set {directory} has no {CLASSNAMES_NAME} (one class name per line, "
                               "in label order)")
        classnames = _read_lines(classnames_path)
        count = _shard_labels(directory, load_manifest(directory), len(classnames), classnames_path)
        layout = "shards"
    else:
        folders = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise EvalSetError(f"zero-shot set {directory} has neither {MANIFEST_NAME} (prep shards) nor class "
                               "sub-folders (ImageFolder layout)")
        classnames = _imagefolder_classnames(directory, folders)
        try:
            count = len(torchvision.datasets.ImageFolder(str(directory)).samples)
        except FileNotFoundError as exc:
            raise EvalSetError(f"zero-shot set {directory}: {exc}") from None
        layout = "imagefolder"
    if count == 0:
        raise EvalSetError(f"zero-shot set {directory} holds no images")
    return ZeroShotSet(directory.name, directory, classnames, templates, count, layout)
