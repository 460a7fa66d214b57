"""Reading the samples of one prep shard with webdataset's tar iterators, checked against the manifest."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import webdataset as wds

from clip_dro.errors import UserError
from clip_dro.manifest import IMAGE_EXTENSIONS, ShardInfo


class ShardDataError(UserError):
    """A shard sample that does not match its manifest; the message names the shard file and the key."""


@dataclass
class RawSample:
    """An undecoded sample: the image bytes and the captions with their global indices."""

    shard: Path
    key: str
    index: int
    image_index: int
    text_index: list[int]
    captions: list[str]
    image: bytes


def _parse(path: Path, key: str, sample: dict, num_images: int, num_texts: int) -> RawSample:
    where = f"shard {path}, sample key {key}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or "json" not in sample or "txt" not in sample:
        raise ShardDataError(f"{where}: needs an image ({'/'.join(IMAGE_EXTENSIONS)}), .txt and .json")
    try:
        meta = json.loads(sample["json"])
        index, image_index = int(meta["index"]), int(meta["image_index"])
        text_index = [int(t) for t in meta["text_index"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardDataError(f"{where}: .json lacks a valid index, image_index or text_index ({exc})") from None
    captions = sample["txt"].decode("utf-8").split("\n")
    if len(captions) != len(text_index):
        raise ShardDataError(f"{where}: {len(captions)} captions but {len(text_index)} text_index entries")
    if not 0 <= image_index < num_images:
        raise ShardDataError(f"{where}: image_index {image_index} is outside the manifest's {num_images} images")
    bad = [t for t in text_index if not 0 <= t < num_texts]
    if bad:
        raise ShardDataError(f"{where}: text_index {bad[0]} is outside the manifest's {num_texts} captions")
    return RawSample(path, key, index, image_index, text_index, captions, sample[ext])


def read_shard(path: Path, info: ShardInfo, positions: Iterable[int], num_images: int, num_texts: int
               ) -> dict[int, RawSample]:
    """The samples at ``positions`` (index - first_index) of the shard at ``path``, checked, not decoded.

    Other samples are streamed past without parsing. A sample whose index does not belong to the shard, or
    whose image/text indices fall outside the manifest's sizes, is a ShardDataError.
    """
    wanted = set(int(p) for p in positions)
    found: dict[int, RawSample] = {}
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            key = sample["__key__"]
            try:
                position = int(key) - info.first_index
            except ValueError:
                raise ShardDataError(f"shard {path}, sample key {key}: the key is not a sample index") from None
            if not 0 <= position < info.num_samples:
                raise ShardDataError(f"shard {path}, sample key {key}: index outside the shard's range "
                                     f"{info.first_index}..{info.first_index + info.num_samples - 1}")
            if position in wanted:
                raw = _parse(path, key, sample, num_images, num_texts)
                if raw.index != int(key):
                    raise ShardDataError(f"shard {path}, sample key {key}: .json index {raw.index} "
                                         "differs from the key")
                found[position] = raw
                if len(found) == len(wanted):
                    break
    except ShardDataError:
        raise
    except Exception as exc:  # tarfile / webdataset errors on a damaged shard
        raise ShardDataError(f"shard {path}: cannot be read ({type(exc).__name__}: {exc})") from None
    missing = wanted - found.keys()
    if missing:
        raise ShardDataError(f"shard {path}: sample key {info.first_index + min(missing):09d} is missing "
                             f"(the manifest says the shard holds {info.num_samples} samples)")
    return found
