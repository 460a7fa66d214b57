"""Reading evaluation sets (design.md §8.3), checked before anything is encoded.

* A retrieval set is a prep output directory: every sample is one image with all its captions.
* A zero-shot set is a directory with ``classnames.txt`` (one name per line, in label order), optionally
  ``templates.txt`` (one prompt per line with a ``{c}`` placeholder; default: open_clip's OpenAI ImageNet
  templates) and either prep shards whose samples carry a ``.cls`` label or one sub-folder of images per
  class (the torchvision ImageFolder / ImageNet-val layout, sorted folder names giving the label order).
  For the ImageFolder layout ``classnames.txt`` is optional: without it the folder names are the class names,
  except for exactly 1000 WordNet-id folders (``n01440764`` ...), which get open_clip's ImageNet class names.

The ``check_*`` / ``load_*`` functions keep only the small members of the shards (``.json``, ``.txt``,
``.cls``), read by the one tar reader (``shard_reader.iter_tar``, which also checks that each shard ends
cleanly), and note where each image is (:class:`ImageRef`: a file, an offset in a plain tar shard, or pixels
held in memory); :func:`image_batches` then decodes the images in order, in DataLoader workers if asked, and
hands back an image that cannot be decoded as a :class:`BadImage` instead of failing, so that the caller
decides whether one bad file ends an evaluation. Other layouts (CLIP_benchmark's webdataset sets, Karpathy
JSON, CIFAR archives) are read into the same types by :mod:`clip_dro.data.benchmark_sets`.

Samples are parsed by the one reader of the sample format (``shard_reader.parse_sample``), and images with
transparency are composited onto white (``shard_reader.to_rgb``). A set given as a URL (``http(s)://``,
``pipe:``, ``s3://``, ... see ``clip_dro.manifest``) must be prep shards; its files are copied once into a
temporary directory (removed at exit), from which everything above works unchanged, messages naming the URL.
"""
from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import open_clip
import torch
import torchvision
from PIL import Image, UnidentifiedImageError

from clip_dro.data.shard_reader import (DECODE_ERRORS, DamagedTar, TarMember, decode_rgb, image_extension,
                                       iter_tar, parse_sample, sample_meta, shard_samples)
from clip_dro.errors import UserError
from clip_dro.manifest import (IMAGE_EXTENSIONS, MANIFEST_NAME, Location, LocationError, Manifest, is_url,
                               join_location, load_manifest, location_name, open_location)

CLASSNAMES_NAME = "classnames.txt"
TEMPLATES_NAME = "templates.txt"
_WORDNET_ID = re.compile(r"n\d{8}")
# The first bytes of a gzip, bzip2, xz or zstd stream: a compressed shard has no image offsets to seek to.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")

Template = Callable[[str], str]


class EvalSetError(UserError):
    """An evaluation set that cannot be read; the message names the directory, file, shard or sample."""


def require_dir(directory: Location, what: str) -> Location:
    """A local directory that exists (as a Path), or a URL (checked when read)."""
    if is_url(directory):
        return str(directory)
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalSetError(f"{what} {directory} does not exist or is not a directory")
    return directory


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a set is: the file ``path``, the member ``member`` of the plain tar shard ``path``,
    or ``pixels`` (an RGB array held in memory, e.g. from a CIFAR archive ``path``)."""

    where: str  # how messages name it: the file, "<shard>: sample <key>", "<archive>: image <i>"
    path: Path
    member: Optional[TarMember] = None
    pixels: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    def read(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        with open(self.path, "rb") as stream:
            stream.seek(self.member.offset)
            data = stream.read(self.member.size)
        if len(data) != self.member.size:
            raise EOFError(f"the shard ends {self.member.size - len(data)} bytes into the image")
        return data


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be read or decoded, and why (one line)."""

    where: str
    reason: str


def decode_image(ref: ImageRef) -> Image.Image | BadImage:
    """The RGB image at ``ref``, or a :class:`BadImage` saying why there is none."""
    if ref.pixels is not None:
        return Image.fromarray(ref.pixels)
    try:
        return decode_rgb(ref.read())
    except UnidentifiedImageError:  # its own message names only the in-memory buffer
        return BadImage(ref.where, "UnidentifiedImageError: not an image format PIL recognizes")
    except DECODE_ERRORS as exc:
        return BadImage(ref.where, f"{type(exc).__name__}: {' '.join(str(exc).split())}")


class _Images(torch.utils.data.Dataset):
    """Item i: ``(i, preprocessed image i)``, or ``(i, BadImage)``: a bad file never raises inside a worker."""

    def __init__(self, refs: Sequence[ImageRef], preprocess: Callable):
        self.refs, self.preprocess = refs, preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        image = decode_image(self.refs[i])
        return i, image if isinstance(image, BadImage) else self.preprocess(image)


@dataclass
class ImageBatch:
    """One batch of consecutive positions of a set: the images that decoded, and the others."""

    rows: list[int]  # positions in the set of the images in ``images``, ascending
    images: Optional[torch.Tensor]  # [len(rows), ...]; None when no image of the batch decoded
    bad: list[BadImage]


def _collate(items: list[tuple[int, Any]]) -> ImageBatch:
    good = [(i, x) for i, x in items if not isinstance(x, BadImage)]
    return ImageBatch([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
                      [x for _, x in items if isinstance(x, BadImage)])


def image_batches(refs: Sequence[ImageRef], preprocess: Callable, batch_size: int,
                  workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches (:class:`ImageBatch`) of ``batch_size`` consecutive images of ``refs``, in order, decoded and
    preprocessed in ``workers`` DataLoader worker processes (0: in this one). A map-style dataset keeps the
    batches the same for any number of workers, and so the results."""
    return torch.utils.data.DataLoader(_Images(refs, preprocess), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, collate_fn=_collate)


# ---------------------------------------------------------------------------------------------- shards


@dataclass
class ShardSample:
    """One sample of a shard as seen by a scan: its members by extension, the small ones as bytes and the
    others (images) as where they lie (:class:`TarMember`)."""

    shard: Path
    key: str
    members: dict[str, bytes | TarMember]
    label: Optional[str] = None  # how messages name the shard (its URL for a copied remote set)

    @property
    def data(self) -> dict[str, bytes]:
        return {ext: value for ext, value in self.members.items() if isinstance(value, bytes)}

    @property
    def where(self) -> str:
        return f"{self.label or self.shard}: sample {self.key}"

    @property
    def image(self) -> Optional[ImageRef]:
        """The sample's image: its member of the first extension of ``IMAGE_EXTENSIONS`` it has."""
        ext = image_extension(self.members)
        return None if ext is None else ImageRef(self.where, self.shard, self.members[ext])


def read_shard(shard: Path, read: set[str], label: Optional[str] = None) -> list[ShardSample]:
    """The samples of one plain tar shard with the bytes of the members whose extension is in ``read``, the
    others noted by offset; messages name it ``label`` (default: its path)."""
    name = label or shard
    try:
        with open(shard, "rb") as stream:
            if stream.read(6).startswith(_COMPRESSED_MAGIC):
                raise EvalSetError(f"{name}: a compressed tar shard; evaluation reads images by their offset in a "
                                   "plain tar, so decompress it first")
            stream.seek(0)
            return [ShardSample(shard, key, members, label)
                    for key, members in iter_tar(stream, str(name), read=lambda ext: ext in read)]
    except DamagedTar as exc:
        raise EvalSetError(str(exc)) from None
    except OSError as exc:
        raise EvalSetError(f"{name}: not a readable tar shard ({exc})") from None


def scan_shards(directory: Path, manifest: Manifest, read: set[str],
                origin: Optional[str] = None) -> Iterator[ShardSample]:
    """Every sample of the shards, in manifest order, with the bytes of the members whose extension is in
    ``read``. A shard must be a complete tar holding the number of samples the manifest lists for it.
    ``origin`` is the URL a local copy ``directory`` was made from: messages name the shards there."""
    for info, shard in zip(manifest.shards, manifest.shard_paths(directory)):
        label = None if origin is None else str(join_location(origin, info.name))
        samples = read_shard(shard, read, label)
        if len(samples) != info.num_samples:
            listed = join_location(origin, MANIFEST_NAME) if origin is not None else directory / MANIFEST_NAME
            raise EvalSetError(f"{label or shard} holds {len(samples)} samples but {listed} lists "
                               f"{info.num_samples} for it")
        yield from samples


def iter_sample_json(directory: Location) -> Iterator[dict[str, Any]]:
    """The ``.json`` record of every sample of a prep directory, in manifest order, without decoding images (a
    local shard's images are skipped over; a remote directory's shards are streamed through once)."""
    directory = require_dir(directory, "prep directory")
    manifest = load_manifest(directory)
    if is_url(directory):
        for info, location in zip(manifest.shards, manifest.shard_locations(directory)):
            for _, key, members in shard_samples(location, info):
                yield _parse_json(f"{location}: sample {key}", members.get("json"))
        return
    for sample in scan_shards(directory, manifest, {"json"}):
        yield _parse_json(sample.where, sample.data.get("json"))


def _parse_json(where: str, raw: Optional[bytes]) -> dict[str, Any]:
    return sample_meta(raw, where, EvalSetError)


_COPIES: list[Path] = []


def _remove_copies() -> None:
    for path in _COPIES:
        shutil.rmtree(path, ignore_errors=True)


def _copy_remote_set(url: str, manifest: Manifest, what: str, optional: tuple[str, ...] = ()) -> Path:
    """A local copy of the prep directory at ``url``: its manifest, shards and the ``optional`` files it has
    (a file that cannot be read is taken as absent); removed when the process exits."""
    if not _COPIES:
        atexit.register(_remove_copies)
    local = Path(tempfile.mkdtemp(prefix="clip-dro-evalset-"))
    _COPIES.append(local)
    manifest.write(local)
    for name in [s.name for s in manifest.shards] + list(optional):
        try:
            with open_location(join_location(url, name)) as stream, open(local / name, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        except (LocationError, OSError) as exc:
            (local / name).unlink(missing_ok=True)
            if name not in optional:
                raise EvalSetError(f"{what} {url}: cannot copy {name} ({exc})") from None
    return local


# ---------------------------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalSetInfo:
    """A checked retrieval set: its images in manifest order, and the captions of each."""

    name: str
    directory: Path
    images: list[ImageRef]
    captions: list[list[str]]

    @property
    def num_samples(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return sum(map(len, self.captions))


def check_retrieval_set(directory: Location) -> RetrievalSetInfo:
    """Check every sample of a retrieval set (an image, captions, indices, each image once) and note where its
    image is, without decoding images."""
    directory = require_dir(directory, "retrieval set")
    manifest = load_manifest(directory)
    if manifest.num_samples == 0:
        raise EvalSetError(f"retrieval set {directory} holds no samples")
    local, origin = directory, None
    if is_url(directory):
        local, origin = _copy_remote_set(directory, manifest, "retrieval set"), directory
    images: list[ImageRef] = []
    captions: list[list[str]] = []
    seen_images: set[int] = set()
    for sample in scan_shards(local, manifest, {"txt", "json"}, origin):
        record = parse_sample(sample.where, sample.members, error=EvalSetError)
        image, sample_captions, image_index = sample.image, record.captions, record.image_index
        if image_index in seen_images:
            raise EvalSetError(f"{sample.where}: image_index {image_index} appears in an earlier sample; a "
                               "retrieval set holds each image once, with all its captions")
        seen_images.add(image_index)
        images.append(image)
        captions.append(sample_captions)
    return RetrievalSetInfo(location_name(directory), directory, images, captions)


# ---------------------------------------------------------------------------------------------- zero-shot


@dataclass
class ZeroShotSet:
    """A zero-shot classification set: class names in label order, prompt templates, and its images with their
    labels in a fixed order (manifest order, or ImageFolder's sorted order)."""

    name: str
    directory: Path
    classnames: list[str]
    templates: list[Template]
    images: list[ImageRef]
    labels: list[int]
    layout: str  # "shards" or "imagefolder"

    @property
    def num_samples(self) -> int:
        return len(self.images)


def read_lines(path: Path, label: Optional[Location] = None) -> list[str]:
    """Non-empty lines of a text file; an empty line between names is an error naming the line (and the file
    as ``label``, default its path)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    path = label or path
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise EvalSetError(f"{path} line {number} is empty")
    if not lines:
        raise EvalSetError(f"{path} is empty")
    return [line.strip() for line in lines]


def format_template(template: str) -> Template:
    return lambda c: template.replace("{c}", c)


def read_templates(directory: Path, origin: Optional[str] = None, name: str = TEMPLATES_NAME,
                   default: Sequence[Template] = open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
                   ) -> list[Template]:
    """The file ``name`` (default ``templates.txt``) as callables (the form open_clip's zero-shot builder
    takes), or ``default`` (open_clip's OpenAI ImageNet templates) where there is none."""
    path = directory / name
    if not path.is_file():
        return list(default)
    label = None if origin is None else join_location(origin, name)
    lines = read_lines(path, label)
    path = label or path
    for number, line in enumerate(lines, start=1):
        if "{c}" not in line:
            raise EvalSetError(f"{path} line {number} has no {{c}} placeholder for the class name: {line!r}")
    return [format_template(line) for line in lines]


def _shard_images(directory: Path, manifest: Manifest, num_classes: int,
                  classnames_path: Location, origin: Optional[str] = None) -> tuple[list[ImageRef], list[int]]:
    """The image and the checked ``.cls`` label of every sample of a zero-shot set's shards."""
    return labelled_images(scan_shards(directory, manifest, {"cls"}, origin), num_classes, classnames_path)


def labelled_images(samples: Iterable[ShardSample], num_classes: int,
                    classnames_path: Location) -> tuple[list[ImageRef], list[int]]:
    """The image and the checked ``.cls`` label (``0 <= label < num_classes``) of every sample."""
    images, labels = [], []
    for sample in samples:
        image = sample.image
        if image is None:
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
        images.append(image)
        labels.append(label)
    return images, labels


def _imagefolder_classnames(directory: Path, folders: list[str]) -> list[str]:
    path = directory / CLASSNAMES_NAME
    if path.is_file():
        classnames = read_lines(path)
        if len(classnames) != len(folders):
            raise EvalSetError(f"{path} has {len(classnames)} class names but {directory} has {len(folders)} "
                               "class sub-folders")
        return classnames
    imagenet = open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES
    if len(folders) == len(imagenet) and all(_WORDNET_ID.fullmatch(f) for f in folders):
        return list(imagenet)
    return folders


def load_zeroshot_set(directory: str | Path) -> ZeroShotSet:
    """Read and check a zero-shot set's class names, templates and labels, and note where its images are
    (images are not decoded)."""
    directory = require_dir(directory, "zero-shot set")
    if is_url(directory):
        manifest = load_manifest(directory)
        local = _copy_remote_set(directory, manifest, "zero-shot set", (CLASSNAMES_NAME, TEMPLATES_NAME))
        classnames_path = local / CLASSNAMES_NAME
        if not classnames_path.is_file():
            raise EvalSetError(f"zero-shot set {directory} has no {CLASSNAMES_NAME} (one class name per line, "
                               "in label order)")
        label = join_location(directory, CLASSNAMES_NAME)
        templates = read_templates(local, directory)
        classnames = read_lines(classnames_path, label)
        images, labels = _shard_images(local, manifest, len(classnames), label, directory)
        if not images:
            raise EvalSetError(f"zero-shot set {directory} holds no images")
        return ZeroShotSet(location_name(directory), directory, classnames, templates, images, labels, "shards")
    templates = read_templates(directory)
    if (directory / MANIFEST_NAME).is_file():
        classnames_path = directory / CLASSNAMES_NAME
        if not classnames_path.is_file():
            raise EvalSetError(f"zero-shot set {directory} has no {CLASSNAMES_NAME} (one class name per line, "
                               "in label order)")
        classnames = read_lines(classnames_path)
        images, labels = _shard_images(directory, load_manifest(directory), len(classnames), classnames_path)
        layout = "shards"
    else:
        folders = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise EvalSetError(f"zero-shot set {directory} has neither {MANIFEST_NAME} (prep shards) nor class "
                               "sub-folders (ImageFolder layout)")
        classnames = _imagefolder_classnames(directory, folders)
        try:  # ImageFolder's listing and order, over the folders named above
            files = torchvision.datasets.folder.make_dataset(
                str(directory), {folder: i for i, folder in enumerate(folders)},
                extensions=torchvision.datasets.folder.IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise EvalSetError(f"zero-shot set {directory}: {exc}") from None
        images = [ImageRef(path, Path(path)) for path, _ in files]
        labels = [label for _, label in files]
        layout = "imagefolder"
    if not images:
        raise EvalSetError(f"zero-shot set {directory} holds no images")
    return ZeroShotSet(directory.name, directory, classnames, templates, images, labels, layout)
