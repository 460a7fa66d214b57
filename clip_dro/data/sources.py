"""Several prep directories trained as one dataset (``data.train`` as a list): the combined view of their
manifests.

Source k's shards, samples, images and captions follow those of sources 0..k-1: its global sample, image and
caption indices are its own plus an offset (the sums of ``num_samples``, ``num_images`` and ``num_texts`` of
the sources before it), so the indices stay dense and disjoint and the per-sample loss state, sized by the
sums, keeps one τ per sample of every source. The shards are numbered the same way (source k's shard j is
global shard ``shard_offset_k + j``), which is all the loader's schedule sees (``clip_dro.data.lanes``).

One source is the single-directory case unchanged: offsets 0 and its manifest's ``dataset_id``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from clip_dro.errors import UserError
from clip_dro.manifest import Location, Manifest, ShardInfo, as_location, load_manifest


@dataclass(frozen=True)
class Source:
    """One prep directory and where its indices start in the combined dataset."""

    location: Location
    manifest: Manifest
    sample_offset: int
    image_offset: int
    text_offset: int
    shard_offset: int

    def layout(self) -> dict[str, Any]:
        """What a checkpoint records of the source (``TrainerState.sources``): its fingerprint, sizes and
        offsets; not its location, which may move between runs."""
        m = self.manifest
        return {"dataset_id": m.dataset_id, "num_images": m.num_images, "num_texts": m.num_texts,
                "image_offset": self.image_offset, "text_offset": self.text_offset}


class TrainSources:
    """The training sources of a run, in ``data.train`` order (see the module docstring)."""

    def __init__(self, locations: Location | Sequence[Location]):
        if isinstance(locations, (str, bytes)) or not isinstance(locations, Sequence):
            locations = [locations]
        if not locations:
            raise UserError("data.train: no prep directory given")
        self.sources: list[Source] = []
        samples = images = texts = shards = 0
        for location in locations:
            location = as_location(location)
            manifest = load_manifest(location)
            self.sources.append(Source(location, manifest, samples, images, texts, shards))
            samples, images = samples + manifest.num_samples, images + manifest.num_images
            texts, shards = texts + manifest.num_texts, shards + len(manifest.shards)
        self.num_samples, self.num_images, self.num_texts = samples, images, texts
        self.shard_sizes = np.array([s.num_samples for src in self.sources for s in src.manifest.shards],
                                    dtype=np.int64)
        # Global shard g belongs to source _shard_source[g].
        self._shard_source = np.repeat(np.arange(len(self.sources)), [len(s.manifest.shards) for s in self.sources])

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def num_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def name(self) -> str:
        """The sources for messages: the directory, or the directories joined with ' + '."""
        return " + ".join(str(s.location) for s in self.sources)

    @property
    def dataset_id(self) -> str:
        """One source: its manifest's ``dataset_id`` (so single-source checkpoints stay comparable); several:
        a fingerprint of their ids in order."""
        if len(self.sources) == 1:
            return self.sources[0].manifest.dataset_id
        ids = json.dumps([s.manifest.dataset_id for s in self.sources])
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    def layout(self) -> list[dict[str, Any]]:
        return [s.layout() for s in self.sources]

    def shard(self, index: int) -> tuple[Source, ShardInfo]:
        """The source of global shard ``index`` and its manifest entry."""
        source = self.sources[int(self._shard_source[index])]
        return source, source.manifest.shards[index - source.shard_offset]

    def source_shard_sizes(self) -> list[np.ndarray]:
        """Per source, its shards' sizes (source k's shard j is global shard ``shard_offset_k + j``)."""
        return [self.shard_sizes[s.shard_offset:s.shard_offset + len(s.manifest.shards)] for s in self.sources]


def locate(layout: Sequence[dict[str, Any]], side: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source number, index within the source) of global ``side`` ("image" or "text") indices, from a
    checkpoint's recorded layout (``TrainSources.layout``)."""
    offsets = np.array([entry[f"{side}_offset"] for entry in layout], dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    source = np.searchsorted(offsets, index, side="right") - 1
    return source, index - offsets[source]
