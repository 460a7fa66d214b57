"""The manifest of a prep output directory (SPEC 3.2): what the shards hold and where they came from.

Shared by the writers in ``data_prep`` and the readers in ``clip_dro.data``; it knows nothing of either.
"""
from __future__ import annotations

from clip_dro.errors import UserError

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
# The image members a sample may carry (SPEC 3.1), in the order readers look for them.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ManifestError(UserError):
    """A prep directory whose manifest is missing, malformed, or does not fit what reads it."""


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
    # "train", "retrieval" or "zeroshot": what the directory is for.
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
        write_text_atomic(Path(directory) / MANIFEST_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    def shard_paths(self, directory: str | Path) -> list[Path]:
        return [Path(directory) / s.name for s in self.shards]


def write_text_atomic(path: Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _require(data: dict, key: str, kind: type, path: Path) -> Any:
    if key not in data:
        raise ManifestError(f"{path}: missing key {key!r}")
    if not isinstance(data[key], kind) or isinstance(data[key], bool):
        raise ManifestError(f"{path}: key {key!r} should be {kind.__name__}, got {data[key]!r}")
    return data[key]


def load_manifest(directory: str | Path, expected_kind: Optional[str] = None) -> Manifest:
    """Read and check ``DIR/manifest.json``; errors name the file and the key."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} is not a prep output directory: {path} does not exist "
                            "(create it with `clip-dro prep ...`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    version = _require(data, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    shards = []
    for i, s in enumerate(_require(data, "shards", list, path)):
        if not isinstance(s, dict) or not {"name", "num_samples", "first_index"} <= set(s):
            raise ManifestError(f"{path}: shards[{i}] needs name, num_samples and first_index")
        shards.append(ShardInfo(str(s["name"]), int(s["num_samples"]), int(s["first_index"])))
    manifest = Manifest(
        num_samples=_require(data, "num_samples", int, path),
        num_images=_require(data, "num_images", int, path),
        num_texts=_require(data, "num_texts", int, path),
        shards=shards,
        source=_require(data, "source", dict, path),
        accepted=_require(data, "accepted", int, path),
        rejected=_require(data, "rejected", int, path),
        kind=str(data.get("kind", "train")),
        extra=dict(data.get("extra", {})),
    )
    expected_first = 0
    for s in manifest.shards:
        if s.first_index != expected_first:
            raise ManifestError(f"{path}: shard {s.name} starts at index {s.first_index}, expected {expected_first}")
        expected_first += s.num_samples
    if expected_first != manifest.num_samples:
        raise ManifestError(f"{path}: shards hold {expected_first} samples but num_samples is {manifest.num_samples}")
    if expected_kind is not None and manifest.kind != expected_kind:
        raise ManifestError(f"{directory} is a {manifest.kind!r} set, expected a {expected_kind!r} set")
    missing = [p for p in manifest.shard_paths(directory) if not p.is_file()]
    if missing:
        raise ManifestError(f"{path}: shard file {missing[0]} is missing")
    return manifest
