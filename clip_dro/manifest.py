"""The manifest of a prep output directory (design.md §3.2): what the shards hold and where they came from; and
*locations*, the places a prep directory or a shard can be read from.

Shared by the writers in ``data_prep`` and the readers in ``clip_dro.data``; it knows nothing of either.

A location is a local path or a URL, as webdataset and open_clip take them:

* ``http://`` / ``https://``: read with the standard library (streamed, never stored);
* ``pipe:CMD``: the standard output of the shell command CMD (``pipe:aws s3 cp s3://b/x.tar -``); a command
  that exits non-zero is an error naming it. A prep *directory* given as ``pipe:`` names each file with the
  placeholder ``{name}`` (``pipe:aws s3 cp s3://b/train/{name} -``), replaced by ``manifest.json``,
  ``shard-000000.tar``, ...;
* any other ``scheme://`` (``s3://``, ``gs://``, ``file://``, ``memory://``...): through fsspec, an optional
  dependency (``pip install 'clip-dro[remote]'``, which brings fsspec, s3fs and gcsfs).
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import shlex
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Optional, Union

from clip_dro.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
# The image members a sample may carry (design.md §3.1), in the order readers look for them.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Seconds an HTTP connection may stay silent before the read fails.
HTTP_TIMEOUT_S = 60
MANIFEST_KINDS = ("train", "retrieval", "zeroshot")

Location = Union[str, Path]


class ManifestError(UserError):
    """A prep directory whose manifest is missing, malformed, or does not fit what reads it."""


class LocationError(UserError):
    """A location (file or URL) that cannot be opened or read to its end; the message names it."""


# ---------------------------------------------------------------------------------------------- locations

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
NAME_PLACEHOLDER = "{name}"
# A file name that a manifest, a progress log or a set supplies is a plain name: POSIX's portable file name
# characters (letters, digits, '.', '_', '-'), not starting with '.' or '-' (no hidden files, nothing a command
# could take for an option) and without '..'. Such a name cannot leave its directory, and no shell gives any
# of its characters a meaning, so it is safe both as a path below the directory and inside a pipe: command.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
PLAIN_NAME_RULE = ("a plain file name: letters, digits, '.', '_' and '-', not starting with '.' or '-', no '..', "
                   "at most 255 characters")


class UnsafeNameError(UserError):
    """A file name from a manifest, a progress log or a set that is not a plain name (see ``check_plain_name``)."""


def is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name


def check_plain_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (``PLAIN_NAME_RULE``); else UnsafeNameError naming ``where`` (the
    file and entry that supplied it), before anything is opened or run."""
    if not is_plain_name(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise UnsafeNameError(f"{where}: {shown} is not {PLAIN_NAME_RULE}; refusing to open or run it")
    return name


def is_url(location: Location) -> bool:
    """True for ``pipe:`` commands and ``scheme://`` URLs, False for local paths."""
    if isinstance(location, Path):
        return False
    return location.startswith("pipe:") or bool(_SCHEME.match(location))


def as_location(location: Location) -> Location:
    """A URL as the string it is, a local path as a Path (never ``Path(url)``, which folds ``//``)."""
    return location if is_url(location) else Path(location)


def join_location(base: Location, name: str) -> Location:
    """The file ``name`` (a plain file name) of the prep directory at ``base``. In a ``pipe:`` command the name
    is shell-quoted as well, so that only the user's own command text is ever shell."""
    check_plain_name(name, f"a file of {base}")
    if not is_url(base):
        return Path(base) / name
    base = str(base)
    if base.startswith("pipe:"):
        if NAME_PLACEHOLDER not in base:
            raise LocationError(f"{base}: a prep directory given as a pipe: command must name its files with "
                                f"{NAME_PLACEHOLDER}, e.g. 'pipe:aws s3 cp s3://bucket/train/{NAME_PLACEHOLDER} -'")
        return base.replace(NAME_PLACEHOLDER, shlex.quote(name))
    return base.rstrip("/") + "/" + name


def location_name(location: Location) -> str:
    """A short name for a location (the directory name of a path or URL), e.g. a dataset name in results."""
    text = str(location)
    if text.startswith("pipe:"):  # the directory before {name}, else the file name of the last path-like word
        found = re.search(r"([^/\s]+)/" + re.escape(NAME_PLACEHOLDER), text)
        paths = [word for word in text[len("pipe:"):].split() if "/" in word]
        return found.group(1) if found else paths[-1].rstrip("/").rsplit("/", 1)[-1] if paths else "pipe"
    if is_url(text):
        text = text.split("?", 1)[0].split("#", 1)[0]
        return text.rstrip("/").rsplit("/", 1)[-1]
    return Path(text).name


class _PipeReader(io.RawIOBase):
    """The standard output of a shell command, as a readable binary file. Reaching its end waits for the
    command and raises LocationError when it failed; closing it before the end stops the command."""

    def __init__(self, location: str):
        self.location = location
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(location[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                      stderr=self._stderr, stdin=subprocess.DEVNULL)
        self._stdout = self._proc.stdout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._stdout.readinto(buffer)
        if count == 0:
            self._finish()
        return count

    def _finish(self) -> None:
        status = self._proc.wait()
        if status != 0:
            self._stderr.seek(0)
            said = " ".join(self._stderr.read().decode("utf-8", errors="replace").split())
            raise LocationError(f"cannot read {self.location}: the command exited with status {status}"
                                + (f" ({said[-300:]})" if said else ""))

    def close(self) -> None:
        if not self.closed:
            if self._proc.poll() is None:  # stopped early: the rest is not wanted
                self._proc.kill()
            self._stdout.close()
            self._proc.wait()
            self._stderr.close()
        super().close()


def _fsspec_open(url: str) -> IO[bytes]:
    try:
        import fsspec
    except ImportError:
        raise LocationError(f"cannot read {url}: URLs other than http(s):// and pipe: need fsspec "
                            "(pip install 'clip-dro[remote]')") from None
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:  # e.g. s3fs or gcsfs missing
        raise LocationError(f"cannot read {url}: {exc} (pip install 'clip-dro[remote]')") from None
    except (OSError, ValueError) as exc:
        raise LocationError(f"cannot read {url} ({type(exc).__name__}: {exc})") from None


def open_location(location: Location) -> IO[bytes]:
    """A readable binary stream of the file at ``location`` (see the module docstring); LocationError when it
    cannot be opened. Streams read sequentially; only local files can seek."""
    if not is_url(location):
        try:
            return open(location, "rb")
        except OSError as exc:
            raise LocationError(f"cannot read {location} ({exc.strerror or exc})") from None
    url = str(location)
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeReader(url), buffer_size=1 << 16)
    if url.startswith(("http://", "https://")):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise LocationError(f"cannot read {url} (HTTP {exc.code} {exc.reason})") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LocationError(f"cannot read {url} ({getattr(exc, 'reason', exc)})") from None
    return _fsspec_open(url)


def read_location(location: Location) -> bytes:
    """The whole file at ``location``."""
    with open_location(location) as stream:
        try:
            return stream.read()
        except LocationError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise LocationError(f"cannot read {location} ({type(exc).__name__}: {exc})") from None


def location_exists(location: Location) -> bool:
    """Whether a local path exists; URLs are taken to exist (they are checked when read)."""
    return is_url(location) or Path(location).exists()


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    first_index: int


@dataclass
class Manifest:
    num_samples: int
    num_images: int
    num_texts: int
    shards: list[ShardInfo]
    source: dict[str, Any]
    accepted: int
    rejected: int
    # one of MANIFEST_KINDS: what the directory is for.
    kind: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def dataset_id(self) -> str:
        """A fingerprint of the indexed content, so that a checkpoint can tell which dataset it belongs to."""
        key = json.dumps({"num_samples": self.num_samples, "num_images": self.num_images,
                          "num_texts": self.num_texts, "shards": [asdict(s) for s in self.shards],
                          "source": self.source}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dataset_id"] = self.dataset_id
        return data

    def write(self, directory: str | Path) -> None:
        for i, shard in enumerate(self.shards):
            check_plain_name(shard.name, f"{Path(directory) / MANIFEST_NAME}: shards[{i}].name")
        write_text_atomic(Path(directory) / MANIFEST_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    def shard_paths(self, directory: str | Path) -> list[Path]:
        return [Path(directory) / s.name for s in self.shards]

    def shard_locations(self, directory: Location) -> list[Location]:
        """Where each shard is, for a local or remote prep directory."""
        return [join_location(directory, s.name) for s in self.shards]


def write_text_atomic(path: Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _require(data: dict, key: str, kind: type, path: Location) -> Any:
    if key not in data:
        raise ManifestError(f"{path}: missing key {key!r}")
    if not isinstance(data[key], kind) or isinstance(data[key], bool):
        raise ManifestError(f"{path}: key {key!r} should be {kind.__name__}, got {data[key]!r}")
    return data[key]


def _require_count(data: dict, key: str, path: Location) -> int:
    value = _require(data, key, int, path)
    if value < 0:
        raise ManifestError(f"{path}: key {key!r} should be a count (>= 0), got {value}")
    return value


def _shard_entry(entry: Any, where: str) -> ShardInfo:
    """One entry of a manifest's ``shards``, checked: its name is a plain file name (it becomes a path below
    the directory, or a word of a ``pipe:`` command) and its counts are integers."""
    if not isinstance(entry, dict) or not {"name", "num_samples", "first_index"} <= set(entry):
        raise ManifestError(f"{where} needs name, num_samples and first_index")
    name = check_plain_name(entry["name"], f"{where}.name")
    count, first = entry["num_samples"], entry["first_index"]
    if not (isinstance(count, int) and isinstance(first, int)) or isinstance(count, bool) or isinstance(first, bool) \
            or count < 0 or first < 0:
        raise ManifestError(f"{where} ({name}): num_samples and first_index should be counts (integers >= 0), got "
                            f"{count!r} and {first!r}")
    return ShardInfo(name, count, first)


def _read_manifest_text(directory: Location) -> tuple[Location, str]:
    path = join_location(directory, MANIFEST_NAME)
    if not is_url(directory) and not Path(path).is_file():
        raise ManifestError(f"{directory} is not a prep output directory: {path} does not exist "
                            "(create it with `clip-dro prep ...`)")
    try:
        return path, read_location(path).decode("utf-8")
    except LocationError as exc:
        raise ManifestError(f"{directory} is not a prep output directory: {exc}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None


def load_manifest(directory: Location, expected_kind: Optional[str] = None) -> Manifest:
    """Read and check the manifest of the prep directory ``directory`` (a path or a URL, see the module
    docstring); errors name the file and the key. For a local directory the shard files must exist; remote
    shards are checked when read."""
    directory = as_location(directory)
    path, text = _read_manifest_text(directory)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    version = _require(data, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    shards = [_shard_entry(entry, f"{path}: shards[{i}]") for i, entry in enumerate(_require(data, "shards", list, path))]
    kind, extra = data.get("kind", "train"), data.get("extra", {})
    if kind not in MANIFEST_KINDS:
        raise ManifestError(f"{path}: key 'kind' should be one of {', '.join(MANIFEST_KINDS)}, got {kind!r}")
    if not isinstance(extra, dict):
        raise ManifestError(f"{path}: key 'extra' should be an object, got {type(extra).__name__}")
    manifest = Manifest(
        num_samples=_require_count(data, "num_samples", path),
        num_images=_require_count(data, "num_images", path),
        num_texts=_require_count(data, "num_texts", path),
        shards=shards,
        source=_require(data, "source", dict, path),
        accepted=_require_count(data, "accepted", path),
        rejected=_require_count(data, "rejected", path),
        kind=kind,
        extra=extra,
    )
    expected_first = 0
    for s in manifest.shards:
        if s.first_index != expected_first:
            raise ManifestError(f"{path}: shard {s.name} starts at index {s.first_index}, expected {expected_first}")
        expected_first += s.num_samples
    if expected_first != manifest.num_samples:
        raise ManifestError(f"{path}: shards hold {expected_first} samples but num_samples is {manifest.num_samples}")
    if manifest.num_images > manifest.num_samples:  # every sample is one image, and image indices are dense
        raise ManifestError(f"{path}: num_images {manifest.num_images} is more than num_samples "
                            f"{manifest.num_samples}")
    if expected_kind is not None and manifest.kind != expected_kind:
        raise ManifestError(f"{directory} is a {manifest.kind!r} set, expected a {expected_kind!r} set")
    if not is_url(directory):
        missing = [p for p in manifest.shard_paths(directory) if not p.is_file()]
        if missing:
            raise ManifestError(f"{path}: shard file {missing[0]} is missing")
    return manifest
