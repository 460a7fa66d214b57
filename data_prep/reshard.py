"""``clip-dro prep wds``: re-shard webdataset shards (e.g. an img2dataset download of CC3M) with dense indices.

A row is one input sample (key), numbered from 0 across the input shards in the order given. Its image is
the first of ``jpg``/``jpeg``/``png``/``webp``; its captions are the non-empty lines of ``txt`` (so prep
outputs re-shard with all their captions). Samples without an image (failed downloads), without a caption, or
with an undecodable image are rejected. The input ``.json`` fields are kept as source fields (except the
index fields this writer owns), with ``source_shard`` and ``source_key`` added.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import braceexpand
import webdataset as wds

from clip_dro.manifest import IMAGE_EXTENSIONS, Manifest
from data_prep.images import load_bytes
from data_prep.writer import (RESERVED_FIELDS, Candidate, Item, PrepError, Rejection, check_options,
                              clean_caption, write_dataset)



def expand_shards(spec: Union[str, Path, list[str]]) -> list[Path]:
    """Shard paths of a brace pattern ('cc3m/{00000..00331}.tar') or a list of patterns; all must exist."""
    patterns = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths = [Path(p) for pattern in patterns for p in braceexpand.braceexpand(str(pattern))]
    if not paths:
        raise PrepError("--input: no shards given")
    for path in paths:
        if not path.is_file():
            raise PrepError(f"--input: shard {path} does not exist")
    return paths


def _input_fields(raw: Optional[bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(raw) if raw is not None else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in meta.items() if k not in RESERVED_FIELDS} if isinstance(meta, dict) else {}


def shard_items(paths: list[Path]) -> Iterator[Item]:
    """Input samples -> Candidates and Rejections, read with webdataset's tar iterators."""
    row = 0
    for path in paths:
        try:
            for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
                key = sample["__key__"]
                record = {"row": row, "shard": str(path), "key": key}
                row += 1
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                text = sample.get("txt", b"").decode("utf-8", errors="replace")
                captions = [c for c in map(clean_caption, text.splitlines()) if c]
                if ext is None:
                    yield Rejection(record, "missing image")
                elif not captions:
                    yield Rejection(record, "empty caption")
                else:
                    fields = {**_input_fields(sample.get("json")), "source_shard": path.name, "source_key": key}
                    yield Candidate(rows=[record], captions=captions, load=load_bytes, arg=sample[ext],
                                    fields=fields)
        except Exception as exc:  # tarfile and webdataset errors on a damaged shard
            raise PrepError(f"--input: shard {path} is not a readable tar file ({type(exc).__name__}: "
                            f"{exc.args[0] if exc.args else exc})") from None


def prep_wds(input: Union[str, Path, list[str]], output: Path, shard_size: int = 1000, image_size: Optional[int] = None,
             workers: Optional[int] = None) -> Manifest:
    """Re-shard ``input`` into ``output`` (SPEC 2, ``prep wds``)."""
    output = Path(output)
    check_options(shard_size, image_size)
    paths = expand_shards(input)
    digest = hashlib.sha256("".join(f"{p.resolve()}\t{p.stat().st_size}\n" for p in paths).encode()).hexdigest()
    source = {"kind": "wds", "path": str(input) if isinstance(input, (str, Path)) else [str(p) for p in input],
              "num_input_shards": len(paths), "inputs_sha256": digest, "shard_size": shard_size,
              "image_size": image_size}
    return write_dataset(output, source, shard_items(paths), shard_size=shard_size, image_size=image_size,
                         workers=workers, desc="prep wds")
