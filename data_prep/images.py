"""Image work of the prep writers: decode, check, composite transparency, optionally shrink, encode. Runs in
worker processes.

Every loader here is a module-level function ``load(arg, options) -> EncodedImage`` (so that a process pool
can pickle it by reference; ``options`` is an ``ImageOptions``) and raises ``BadImage(reason)`` for an image
that cannot be used; the writer turns that into a rejected row.

Images with an alpha channel or palette transparency are composited onto ``options.background`` (white by
default; ``shard_reader.to_rgb``, the function the loaders use too) and re-encoded: PNG stays PNG (lossless),
anything else becomes JPEG. Other images in a kept format keep their bytes unless shrunk.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image

from clip_dro.data.shard_reader import DECODE_ERRORS, MAX_IMAGE_MEMBER_BYTES, WHITE, has_transparency, to_rgb

# Formats a sample may carry unchanged (design.md §3.1); anything else is re-encoded as JPEG.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 90
RESAMPLE = Image.Resampling.BICUBIC


class BadImage(Exception):
    """An image that cannot become a sample; ``str(exc)`` is the reason written to rejected.jsonl."""


@dataclass(frozen=True)
class ImageOptions:
    """What the writer asks of every image: shrink the shorter side to ``image_size`` (None: keep) and
    composite transparency onto ``background``."""

    image_size: Optional[int] = None
    background: tuple[int, int, int] = WHITE


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str
    width: int
    height: int


def shorter_side_size(width: int, height: int, image_size: Optional[int]) -> Optional[tuple[int, int]]:
    """The (width, height) that makes the shorter side ``image_size``; None when no resize is due.

    Only shrinks: enlarging would make shards bigger without adding information.
    """
    if image_size is None or min(width, height) <= image_size:
        return None
    scale = image_size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _open(data: bytes) -> Image.Image:
    """``Image.open`` without PIL's DecompressionBombWarning, which says nothing the outcome does not: an image
    of up to twice PIL's pixel limit is accepted (and shrunk when asked), a larger one raises
    DecompressionBombError and becomes a rejected row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def encode_bytes(data: bytes, options: ImageOptions = ImageOptions()) -> EncodedImage:
    """Decode ``data`` fully (a truncated file fails here, not in training), composite transparency, shrink if
    asked, encode.

    Unchanged opaque images in a kept format keep their original bytes; JPEGs being shrunk are decoded at a
    reduced DCT scale first (PIL's draft mode), which is most of the speed of shrinking.
    """
    try:
        image = _open(data)
        image_format = image.format
        target = shorter_side_size(image.width, image.height, options.image_size)
        if target is not None and image_format == "JPEG":
            image.draft("RGB", target)
        image.load()
        transparent = has_transparency(image)
        if target is not None or transparent or image_format not in KEPT_FORMATS:
            rgb = to_rgb(image, options.background)
    except DECODE_ERRORS as exc:
        raise BadImage(f"undecodable image ({' '.join(str(exc).split())})") from None
    if target is not None:
        rgb = rgb.resize(target, RESAMPLE)
        return EncodedImage(encode_jpeg(rgb), "jpg", rgb.width, rgb.height)
    if transparent and image_format == "PNG":
        return EncodedImage(encode_png(rgb), "png", rgb.width, rgb.height)
    if transparent or image_format not in KEPT_FORMATS:
        return EncodedImage(encode_jpeg(rgb), "jpg", rgb.width, rgb.height)
    return EncodedImage(data, KEPT_FORMATS[image_format], image.width, image.height)


def load_file(path: str, options: ImageOptions) -> EncodedImage:
    """Loader for an image file on disk (tabular and COCO sources). A table from someone else may name
    /dev/zero, a FIFO or a huge file: only regular files of at most one image member's bound are read."""
    try:
        status = os.stat(path)  # before opening: opening a FIFO would wait for a writer
        if not stat.S_ISREG(status.st_mode):
            raise BadImage(f"not a regular file {path}")
        if status.st_size > MAX_IMAGE_MEMBER_BYTES:
            raise BadImage(f"file {path} holds {status.st_size} bytes, more than the {MAX_IMAGE_MEMBER_BYTES} an "
                           "image may hold")
        with open(path, "rb") as file:
            data = file.read(MAX_IMAGE_MEMBER_BYTES + 1)
    except FileNotFoundError:
        raise BadImage(f"missing file {path}") from None
    except ValueError:  # a NUL byte in the path
        raise BadImage(f"unusable file name {path!r}") from None
    except OSError as exc:
        raise BadImage(f"unreadable file {path} ({exc.strerror})") from None
    return encode_bytes(data, options)


def load_bytes(data: bytes, options: ImageOptions) -> EncodedImage:
    """Loader for image bytes already in memory (re-sharded webdataset samples)."""
    return encode_bytes(data, options)
