"""``clip-dro prep wds``: re-shard webdataset shards (e.g. an img2dataset download of CC3M) with dense indices.

The input is shard paths or URLs, brace patterns expanded as webdataset expands them: ``cc3m/{00000..00331}.tar``,
``https://host/cc3m/{00000..00331}.tar``, ``pipe:aws s3 cp s3://bucket/cc3m/{00000..00331}.tar -``, ``s3://...``
(see ``clip_dro.manifest``). Local shards must exist before any work starts; remote ones are checked as read.

A row is one input sample. Its image is the first of ``IMAGE_EXTENSIONS``; its captions are the non-empty lines
of ``txt`` (so prep outputs re-shard with all their captions). Samples without an image (failed downloads),
without a caption, or with an undecodable image are rejected. An input shard that cannot be read to its end (a
damaged or truncated tar, a URL that fails) is one rejected row naming it and why; the samples read from it
before the damage are kept and prep goes on. The input ``.json`` fields are kept as source fields (except the
index fields this writer owns), with ``source_shard`` and ``source_key`` added.

Order. By default (``--shuffle``) the input shards are taken in a (seed) permutation, ``INTERLEAVE`` of them
open at a time, and each next sample comes from a (seed, row)-random one of the open shards: an input sorted
by source or class does not give clustered output shards, while memory holds one sample per open shard. With
``--no-shuffle`` the shards are read one after another in the order given. Rows are numbered 0, 1, ... in the
order they are processed. An interrupted run resumes from the open shards' positions (recorded with every
complete output shard): it reopens those shards only and skips what they already gave, without image work.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import braceexpand
import numpy as np

from clip_dro.data.shard_reader import DamagedTar, caption_lines, image_extension, iter_tar
from clip_dro.manifest import Location, LocationError, Manifest, is_url, location_name, open_location
from data_prep.images import load_bytes
from data_prep.writer import (RESERVED_FIELDS, Candidate, Item, PrepError, Rejection, check_options,
                              clean_caption, write_dataset)

INTERLEAVE = 16  # input shards open at once when shuffling
_CHOICE_TAG, _CHOICE_BLOCK = 12, 4096


def expand_shards(spec: Union[str, Path, list[str]]) -> list[Location]:
    """Shard locations of a brace pattern ('cc3m/{00000..00331}.tar', or a URL) or a list of patterns; local
    shards must exist."""
    patterns = [spec] if isinstance(spec, (str, Path)) else list(spec)
    locations: list[Location] = []
    for pattern in patterns:
        for text in braceexpand.braceexpand(str(pattern)):
            locations.append(text if is_url(text) else Path(text))
    if not locations:
        raise PrepError("--input: no shards given")
    for location in locations:
        if isinstance(location, Path) and not location.is_file():
            raise PrepError(f"--input: shard {location} does not exist")
    return locations


def _input_fields(raw: Optional[bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(raw) if raw is not None else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in meta.items() if k not in RESERVED_FIELDS} if isinstance(meta, dict) else {}


class _Input:
    """One input shard being read: its samples as events ("sample", key, members) and, when it cannot be
    read to its end, a last ("damaged", reason). ``consumed`` samples were handed out (and are skipped when
    the shard is reopened by a resumed run)."""

    def __init__(self, ordinal: int, location: Location, consumed: int = 0):
        self.ordinal, self.location, self.consumed = ordinal, location, consumed
        self._events: Optional[Iterator[tuple]] = None

    def _read(self) -> Iterator[tuple]:
        try:
            stream = open_location(self.location)
        except LocationError as exc:
            yield ("damaged", str(exc))
            return
        with stream:
            try:
                for number, (key, members) in enumerate(iter_tar(stream, str(self.location))):
                    if number >= self.consumed:
                        yield ("sample", key, members)
            except DamagedTar as exc:
                yield ("damaged", str(exc))

    def next(self) -> Optional[tuple]:
        if self._events is None:
            self._events = self._read()
        return next(self._events, None)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _choice(seed: int, row: int, width: int, cache: dict) -> int:
    """Which of ``width`` open shards gives row ``row``: a function of (seed, row) only."""
    block = row // _CHOICE_BLOCK
    if cache.get("block") != block:
        cache["block"] = block
        cache["u"] = np.random.default_rng([_CHOICE_TAG, seed, block]).random(_CHOICE_BLOCK)
    return int(cache["u"][row % _CHOICE_BLOCK] * width)


def _item(event: tuple, row: int, location: Location) -> Item:
    if event[0] == "damaged":
        return Rejection({"row": row, "shard": str(location), "key": None}, f"damaged input shard: {event[1]}")
    _, key, members = event
    record = {"row": row, "shard": str(location), "key": key}
    ext = image_extension(members)
    captions = [c for c in map(clean_caption, caption_lines(members.get("txt"), record["shard"], strict=False)) if c]
    if ext is None:
        return Rejection(record, "missing image")
    if not captions:
        return Rejection(record, "empty caption")
    fields = {**_input_fields(members.get("json")), "source_shard": location_name(location), "source_key": key}
    return Candidate(rows=[record], captions=captions, load=load_bytes, arg=members[ext], fields=fields)


def shard_items(locations: list[Location], shuffle: bool = False, seed: int = 0,
                cursor: Optional[dict[str, Any]] = None) -> Iterator[Item]:
    """Input samples -> Candidates and Rejections in processing order (module docstring), each carrying the
    cursor a resumed run restarts from; ``cursor`` is that of the last item already consumed."""
    order = np.random.default_rng([_CHOICE_TAG, seed]).permutation(len(locations)) if shuffle \
        else np.arange(len(locations))
    width = INTERLEAVE if shuffle else 1
    row, next_input, open_inputs = 0, 0, []
    if cursor is not None:
        row, next_input = cursor["row"], cursor["next"]
        open_inputs = [_Input(k, locations[order[k]], consumed) for k, consumed in cursor["open"]]
    cache: dict = {}
    try:
        while True:
            while len(open_inputs) < width and next_input < len(locations):
                open_inputs.append(_Input(next_input, locations[order[next_input]]))
                next_input += 1
            if not open_inputs:
                return
            source = open_inputs[_choice(seed, row, len(open_inputs), cache) if len(open_inputs) > 1 else 0]
            event = source.next()
            if event is None or event[0] == "damaged":
                open_inputs.remove(source)
                source.close()
                if event is None:
                    continue
            else:
                source.consumed += 1
            item = _item(event, row, source.location)
            row += 1
            item.cursor = {"row": row, "next": next_input, "open": [[s.ordinal, s.consumed] for s in open_inputs]}
            yield item
    finally:
        for source in open_inputs:
            source.close()


def _identity(locations: list[Location]) -> str:
    """A fingerprint of the input: local shards by resolved path and size, URLs by their text."""
    lines = [f"{p.resolve()}\t{p.stat().st_size}" if isinstance(p, Path) else str(p) for p in locations]
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()


def prep_wds(input: Union[str, Path, list[str]], output: Path, shard_size: int = 1000, image_size: Optional[int] = None,
             workers: Optional[int] = None, shuffle: bool = True, seed: int = 0, background: Any = "white"
             ) -> Manifest:
    """Re-shard ``input`` into ``output`` (design.md §2.1, ``prep wds``)."""
    output = Path(output)
    rgb = check_options(shard_size, image_size, seed, background)
    locations = expand_shards(input)
    source = {"kind": "wds", "path": str(input) if isinstance(input, (str, Path)) else [str(p) for p in input],
              "num_input_shards": len(locations), "inputs_sha256": _identity(locations), "shard_size": shard_size,
              "image_size": image_size, "shuffle": shuffle, "seed": seed,
              "interleave": INTERLEAVE if shuffle else 1, "background": list(rgb)}
    return write_dataset(output, source, lambda cursor: shard_items(locations, shuffle, seed, cursor),
                         shard_size=shard_size, image_size=image_size, workers=workers, desc="prep wds",
                         background=rgb)
