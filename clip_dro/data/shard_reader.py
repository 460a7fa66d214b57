"""The sample format of prep shards (design.md §3.1), parsed in one place for training, evaluation, prep and the
tests; reading shards as streams from any location (a path or a URL, see ``clip_dro.manifest``); and turning
image bytes into RGB, transparency composited onto a background.

A sample is the tar members that share a key (webdataset's ``base_plus_ext``, extension lowercased): an
image (the first of ``IMAGE_EXTENSIONS`` present), ``.txt`` with one caption per line (``splitlines``) and
``.json`` with ``index``, ``image_index`` and ``text_index`` (one entry per caption line).
"""
from __future__ import annotations

import http.client
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Mapping, Optional

from PIL import Image, ImageColor
from webdataset.tariterators import base_plus_ext

from clip_dro.errors import UserError
from clip_dro.manifest import IMAGE_EXTENSIONS, Location, LocationError, ShardInfo, open_location

WHITE = (255, 255, 255)
_TAR_BLOCK = 512
# What one tar member may hold, read into memory whole: a shard from someone else could claim a 10 GB caption.
# Images get room for a 150-megapixel PNG; captions, metadata and labels are small text.
MAX_IMAGE_MEMBER_BYTES = 512 << 20
MAX_OTHER_MEMBER_BYTES = 16 << 20

ErrorType = Callable[[str], Exception]


class ShardDataError(UserError):
    """A shard sample that does not match its manifest; the message names the shard file and the key."""


class DamagedTar(ShardDataError):
    """A tar stream that cannot be read to its end: unreadable, truncated or damaged."""


# ---------------------------------------------------------------------------------------------- images


def parse_background(value: Any) -> tuple[int, int, int]:
    """An RGB triple from a colour name, ``#rrggbb`` or ``r,g,b``; ValueError naming the value otherwise."""
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v < 256
                                                                    for v in value):
        return tuple(value)  # type: ignore[return-value]
    text = str(value).strip()
    parts = text.split(",")
    try:
        if len(parts) == 3:
            rgb = tuple(int(p) for p in parts)
            if all(0 <= v < 256 for v in rgb):
                return rgb  # type: ignore[return-value]
            raise ValueError
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(f"{value!r} is not a colour (a name such as white, #rrggbb, or r,g,b)") from None


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel, or palette / single-colour transparency (PNG tRNS, GIF)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``image`` as a new RGB image; transparent pixels are composited onto ``background`` (a plain
    ``convert("RGB")`` drops the alpha channel, so dark line art on a transparent background turns black)."""
    if not has_transparency(image):
        return image.convert("RGB")
    canvas = Image.new("RGBA", image.size, (*background, 255))
    canvas.alpha_composite(image.convert("RGBA"))
    return canvas.convert("RGB")


# What decoding a damaged image raises: OSError for PIL's truncated or broken data; DecompressionBombError
# (not an OSError) for an image of more than twice PIL's MAX_IMAGE_PIXELS; SyntaxError, ValueError and
# EOFError for what some PIL plugins raise on malformed headers.
DECODE_ERRORS = (OSError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError)


def decode_rgb(data: bytes, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Decode image bytes fully into RGB (see ``to_rgb``); PIL's errors (``DECODE_ERRORS``) propagate."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image, background)


# ---------------------------------------------------------------------------------------------- samples


def image_extension(members: Mapping[str, Any]) -> Optional[str]:
    """The extension of a sample's image member: the first of ``IMAGE_EXTENSIONS`` it has."""
    return next((e for e in IMAGE_EXTENSIONS if e in members), None)


def caption_lines(raw: Optional[bytes], where: str, error: ErrorType = ShardDataError, strict: bool = True
                  ) -> list[str]:
    """The captions of a ``.txt`` member, one per line (none for a missing or empty member). Bytes that are not
    UTF-8 are an error, or with ``strict=False`` (foreign input) replaced."""
    if raw is None:
        return []
    try:
        return raw.decode("utf-8", errors="strict" if strict else "replace").splitlines()
    except UnicodeDecodeError:
        raise error(f"{where}: .txt is not UTF-8 text") from None


def sample_meta(raw: Optional[bytes], where: str, error: ErrorType = ShardDataError) -> dict[str, Any]:
    """The ``.json`` member of a sample as a dict."""
    if raw is None:
        raise error(f"{where} has no .json member")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{where}: .json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise error(f"{where}: .json is not an object")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SampleRecord:
    """The parsed small members of one sample; ``image_ext`` names its image member."""

    meta: dict[str, Any]
    captions: list[str]
    image_ext: str
    index: Optional[int]
    image_index: int
    text_index: list[int]


def parse_sample(where: str, members: Mapping[str, Any], *, error: ErrorType = ShardDataError,
                 num_images: Optional[int] = None, num_texts: Optional[int] = None,
                 require_index: bool = False) -> SampleRecord:
    """Check and parse one sample of the format above. ``members`` maps extension -> member (only ``txt`` and
    ``json`` are read, as bytes; the image member need only be present). ``num_images`` / ``num_texts`` bound
    the indices; errors (of type ``error``) start with ``where``."""
    meta = sample_meta(members.get("json"), where, error)
    ext = image_extension(members)
    if ext is None:
        raise error(f"{where} has no image (.{', .'.join(IMAGE_EXTENSIONS)})")
    captions = caption_lines(members.get("txt"), where, error)
    if not captions:
        raise error(f"{where} has no captions (empty or missing .txt): a sample needs at least one caption")
    index = meta.get("index")
    if require_index and not _is_int(index):
        raise error(f"{where}: .json key 'index' should be an integer, got {index!r}")
    image_index, text_index = meta.get("image_index"), meta.get("text_index")
    if not _is_int(image_index):
        raise error(f"{where}: .json key 'image_index' should be an integer, got {image_index!r}")
    if not isinstance(text_index, list) or not all(_is_int(t) for t in text_index):
        raise error(f"{where}: .json key 'text_index' should be a list of integers, got {text_index!r}")
    if len(text_index) != len(captions):
        raise error(f"{where}: {len(captions)} caption lines in .txt but {len(text_index)} entries in .json "
                    "'text_index'")
    if num_images is not None and not 0 <= image_index < num_images:
        raise error(f"{where}: image_index {image_index} is outside the manifest's {num_images} images")
    bad = [t for t in text_index if num_texts is not None and not 0 <= t < num_texts]
    if bad:
        raise error(f"{where}: text_index {bad[0]} is outside the manifest's {num_texts} captions")
    return SampleRecord(meta, captions, ext, index if _is_int(index) else None, image_index, text_index)


# ---------------------------------------------------------------------------------------------- tar streams


class _Tail(io.RawIOBase):
    """A read-through wrapper that remembers the last bytes read, to look at the block where tarfile stopped."""

    KEEP = 1 << 16

    def __init__(self, raw: IO[bytes]):
        self.raw, self.total, self.buf = raw, 0, bytearray()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        self.buf += data
        if len(self.buf) > self.KEEP:
            del self.buf[:len(self.buf) - self.KEEP]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def block(self, offset: int) -> Optional[bytes]:
        start = offset - (self.total - len(self.buf))
        return bytes(self.buf[start:start + _TAR_BLOCK]) if start >= 0 else None


# What a damaged or cut tar stream raises while being read.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, http.client.HTTPException)


def _ended_cleanly(tar: tarfile.TarFile, tail: _Tail) -> bool:
    """A plain tar ends with a block of zeros right where its members end; tarfile stops without a word at a
    header that is cut short or damaged, so without this a cut shard would pass for one with fewer members."""
    stream = tar.fileobj
    if getattr(stream, "comptype", "tar") != "tar":  # compressed: tarfile's decompressor checks the end
        return True
    return getattr(stream, "pos", None) == tar.offset + _TAR_BLOCK and tail.block(tar.offset) == bytes(_TAR_BLOCK)


@dataclass(frozen=True)
class TarMember:
    """A member that ``iter_tar`` passed over: where its bytes lie in a plain (uncompressed) tar file."""

    offset: int
    size: int


def iter_tar(stream: IO[bytes], where: str, read: Callable[[str], bool] = lambda ext: True
             ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: bytes}) of the samples of a tar stream, members grouped as webdataset groups them.
    A member whose (lowercased) extension ``read`` refuses is passed over, its value a :class:`TarMember`
    (so evaluation notes where each image is without holding it). A stream that cannot be read to a clean
    end raises DamagedTar naming ``where``; the sample being read when the damage shows is not yielded."""
    tail = _Tail(stream)
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    try:
        tar = tarfile.open(fileobj=tail, mode="r|*")
        for info in tar:
            tar.members = []  # streamed: keep no index of what was read
            name = info.name
            if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            base, ext = base_plus_ext(name)
            if base is None:
                continue
            limit = MAX_IMAGE_MEMBER_BYTES if ext.lower() in IMAGE_EXTENSIONS else MAX_OTHER_MEMBER_BYTES
            if info.size > limit:
                raise DamagedTar(f"{where}: member {name} holds {info.size} bytes, more than the {limit} one such "
                                 "member may hold")
            data = tar.extractfile(info).read() if read(ext.lower()) else TarMember(info.offset_data, info.size)
            if base != key:
                if key is not None:
                    yield key, members
                key, members = base, {}
            ext = ext.lower()
            if ext in members:
                raise DamagedTar(f"{where}: member {name} appears twice in sample {base}")
            members[ext] = data
        if not _ended_cleanly(tar, tail):
            after = f" after sample {key}" if key is not None else ""
            raise DamagedTar(f"{where}: truncated or damaged tar (no end-of-archive block{after})")
    except DamagedTar:
        raise
    except LocationError as exc:
        raise DamagedTar(f"{where}: cannot be read ({exc})") from None
    except _TAR_ERRORS as exc:
        raise DamagedTar(f"{where}: cannot be read, truncated or damaged ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())})") from None
    if key is not None:
        yield key, members


def shard_samples(location: Location, info: ShardInfo, start: int = 0, stop: Optional[int] = None
                  ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, members) of the shard at ``location`` for positions [start, stop) (default: to the
    end), position = sample index - first_index. Keys must run first_index, first_index + 1, ... and a shard
    read to its end must hold the manifest's count. The stream is closed when the caller stops."""
    stop = info.num_samples if stop is None else stop
    last = info.first_index + info.num_samples - 1
    try:
        stream = open_location(location)
    except LocationError as exc:
        raise ShardDataError(f"shard {location}: {exc}") from None
    with stream:
        position = 0
        for key, members in iter_tar(stream, f"shard {location}"):
            try:
                index = int(key)
            except ValueError:
                raise ShardDataError(f"shard {location}, sample key {key}: the key is not a sample index") from None
            if index != info.first_index + position or position >= info.num_samples:
                where = "outside the shard's range" if not info.first_index <= index <= last else "out of order"
                raise ShardDataError(f"shard {location}, sample key {key}: index {where} (expected "
                                     f"{info.first_index + position} of {info.first_index}..{last})")
            if position >= stop:
                return
            if position >= start:
                yield position, key, members
            position += 1
        if position < stop:
            raise ShardDataError(f"shard {location}: sample key {info.first_index + position:09d} is missing "
                                 f"(the manifest says the shard holds {info.num_samples} samples)")


@dataclass
class RawSample:
    """An undecoded training sample: the image bytes and the captions with their global indices."""

    shard: Location
    key: str
    index: int
    image_index: int
    text_index: list[int]
    captions: list[str]
    image: bytes


def raw_sample(location: Location, key: str, members: dict[str, bytes], num_images: int, num_texts: int
               ) -> RawSample:
    """A training sample parsed and checked against the manifest's sizes."""
    where = f"shard {location}, sample key {key}"
    record = parse_sample(where, members, num_images=num_images, num_texts=num_texts, require_index=True)
    if record.index != int(key):
        raise ShardDataError(f"{where}: .json index {record.index} differs from the key")
    return RawSample(location, key, record.index, record.image_index, record.text_index, record.captions,
                     members[record.image_ext])
