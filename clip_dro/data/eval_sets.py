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


def require_dir(directory: str | Path, what: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalSetError(f"{what} {directory} does not exist or is not a directory")
    return directory


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a set is: the file ``path``, or the member ``member`` of the shard tar ``path``."""

    where: str  # how messages name it: the file, or "<shard>: sample <key>"
    path: Path
    member: Optional[tarfile.TarInfo] = None

    def read(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        # The member as the scan found it: tarfile reads its bytes without indexing the archive again (a
        # compressed shard is decompressed up to the member each time; prep writes plain tars).
        with tarfile.open(self.path) as tar:
            return tar.extractfile(self.member).read()


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be read or decoded, and why (one line)."""

    where: str
    reason: str


# What reading and decoding a damaged image raises: OSError for an unreadable file and for PIL's truncated or
# broken data; tarfile.TarError for a shard member cut short; DecompressionBombError (not an OSError) for an
# image of more than twice PIL's MAX_IMAGE_PIXELS; SyntaxError, ValueError and EOFError for what some PIL
# plugins raise on malformed headers.
_DECODE_ERRORS = (OSError, tarfile.TarError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError)


def decode_image(ref: ImageRef) -> Image.Image | BadImage:
    """The RGB image at ``ref``, or a :class:`BadImage` saying why there is none."""
    try:
        with Image.open(io.BytesIO(ref.read())) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:  # its own message names only the in-memory buffer
        return BadImage(ref.where, "UnidentifiedImageError: not an image format PIL recognizes")
    except _DECODE_ERRORS as exc:
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
    """One sample of a shard as seen by a scan: its members by extension, and the bytes of the small ones."""

    shard: Path
    key: str
    members: dict[str, tarfile.TarInfo]
    data: dict[str, bytes]

    @property
    def where(self) -> str:
        return f"{self.shard}: sample {self.key}"

    @property
    def image(self) -> Optional[ImageRef]:
        """The sample's image: its member of the first extension of ``IMAGE_EXTENSIONS`` it has."""
        ext = next((e for e in IMAGE_EXTENSIONS if e in self.members), None)
        return None if ext is None else ImageRef(self.where, self.shard, self.members[ext])


def _check_archive_end(tar: tarfile.TarFile, shard: Path, last: Optional[tarfile.TarInfo]) -> None:
    """A complete tar archive has its end-of-archive block (zeros) right after its last member. tarfile stops
    without a word at a header that is cut short or damaged, so without this a truncated shard would pass for
    one with fewer members."""
    if last is None:  # tarfile.open has already refused a first header cut short or damaged
        return
    tar.fileobj.seek(last.offset_data + -(-last.size // _TAR_BLOCK) * _TAR_BLOCK)
    if tar.fileobj.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
        raise EvalSetError(f"{shard}: truncated or damaged tar shard (no end-of-archive block after member "
                           f"{last.name})")


def _read_shard(shard: Path, read: set[str]) -> list[ShardSample]:
    """The samples of one shard with the bytes of the members whose extension is in ``read``, grouped by key
    the way webdataset groups them (``base_plus_ext``)."""
    try:
        with tarfile.open(shard) as tar:
            samples: list[ShardSample] = []
            last: Optional[tarfile.TarInfo] = None
            for member in tar:
                last = member
                key, ext = base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                ext = ext.lower()
                if not samples or samples[-1].key != key:
                    samples.append(ShardSample(shard, key, {}, {}))
                samples[-1].members[ext] = member
                if ext in read:
                    samples[-1].data[ext] = tar.extractfile(member).read()
            _check_archive_end(tar, shard, last)
            return samples
    except (tarfile.TarError, EOFError, OSError) as exc:  # EOFError: a compressed shard cut short
        raise EvalSetError(f"{shard}: not a readable tar shard, truncated or damaged ({exc})") from None


def scan_shards(directory: Path, manifest: Manifest, read: set[str]) -> Iterator[ShardSample]:
    """Every sample of the shards, in manifest order, with the bytes of the members whose extension is in
    ``read``. A shard must be a complete tar holding the number of samples the manifest lists for it."""
    for info, shard in zip(manifest.shards, manifest.shard_paths(directory)):
        samples = _read_shard(shard, read)
        if len(samples) != info.num_samples:
            raise EvalSetError(f"{shard} holds {len(samples)} samples but {directory / MANIFEST_NAME} lists "
                               f"{info.num_samples} for it")
        yield from samples


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
    """Check every sample of a retrieval set (an image, captions, indices, each image once) and note where its
    image is, without decoding images."""
    directory = require_dir(directory, "retrieval set")
    manifest = load_manifest(directory)
    if manifest.num_samples == 0:
        raise EvalSetError(f"retrieval set {directory} holds no samples")
    images: list[ImageRef] = []
    captions: list[list[str]] = []
    seen_images: set[int] = set()
    for sample in scan_shards(directory, manifest, {"txt", "json"}):
        try:
            text = sample.data["txt"].decode("utf-8") if "txt" in sample.data else None
        except UnicodeDecodeError:
            raise EvalSetError(f"{sample.where}: .txt is not UTF-8 text") from None
        image = sample.image
        sample_captions, image_index, _ = parse_retrieval_sample(sample.where, image is not None, text,
                                                                 _parse_json(sample.where, sample.data.get("json")))
        if image_index in seen_images:
            raise EvalSetError(f"{sample.where}: image_index {image_index} appears in an earlier sample; a "
                               "retrieval set holds each image once, with all its captions")
        seen_images.add(image_index)
        images.append(image)
        captions.append(sample_captions)
    return RetrievalSetInfo(directory.name, directory, images, captions)


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


def _shard_images(directory: Path, manifest: Manifest, num_classes: int,
                  classnames_path: Path) -> tuple[list[ImageRef], list[int]]:
    """The image and the checked ``.cls`` label of every sample of a zero-shot set's shards."""
    images, labels = [], []
    for sample in scan_shards(directory, manifest, {"cls"}):
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
    """Read and check a zero-shot set's class names, templates and labels, and note where its images are
    (images are not decoded)."""
    directory = require_dir(directory, "zero-shot set")
    templates = read_templates(directory)
    if (directory / MANIFEST_NAME).is_file():
        classnames_path = directory / CLASSNAMES_NAME
        if not classnames_path.is_file():
            raise EvalSetError(f"zero-shot set {directory} has no {CLASSNAMES_NAME} (one class name per line, "
                               "in label order)")
        classnames = _read_lines(classnames_path)
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
