"""The training loader: global batches that do not depend on how many processes and workers read them.

Design. The data is read as L *lanes* (``data.lanes``; default processes x max(workers, 1)). In epoch e the
shards are permuted with seed (seed, e) and laid end to end; the sequence is cut into L contiguous lane ranges
of at least steps x c samples each, with c = B / L (B = per-process batch x processes) and steps = N // B, so
every sample of the epoch is used but for fewer than one global batch (``lanes.plan_epoch``). Each lane's
stream is mixed by a shuffle buffer of ``shuffle_buffer`` samples whose order is computed from (seed, e,
lane, block). At every step each lane gives its next c samples, and the global batch of step k is lanes
0..L-1 in order. All of this is a function of the manifest, the seed, L, B and the buffer only. Several
sources (``data.train`` as a list) are one sequence of shards with global indices (``clip_dro.data.sources``);
with ``data.weights`` the epoch is a virtual one drawn from (seed, e) (``lanes.plan_resampled_epoch``).

Rank r reads lanes [r L/W, (r+1) L/W): its slice of the global batch, in order. With ``workers`` > 0 a torch
DataLoader runs one worker per contiguous sub-block of the rank's lanes; each worker yields its piece of
every step, DataLoader's in-order round robin delivers pieces 0..workers-1 of a step consecutively, and they
are concatenated into the rank's batch. So a shard is read by one (process, worker) (a shard a lane cut falls
in, by the two that read its two parts), and W processes with batch b see exactly the global batches of one
process with batch W b (for the same L: set ``data.lanes`` explicitly to compare runs on different numbers of
processes, since its default changes with them).

Per sample, the caption (one of its captions) and the seed of the random image augmentation are drawn from
(seed, epoch, sample index), so they too are the same whoever reads the sample, and resuming at a step
reproduces the remaining batches. Shards are read as streams, from a local directory or a URL
(``clip_dro.manifest``); images with transparency are composited onto ``background``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_dro.config import DataConfig
from clip_dro.data import lanes as plan
from clip_dro.data.shard_reader import (DECODE_ERRORS, RawSample, ShardDataError, decode_rgb, parse_background,
                                       raw_sample, shard_samples)
from clip_dro.data.sources import Source, TrainSources
from clip_dro.errors import UserError
from clip_dro.manifest import Location, Manifest, join_location


class LoaderError(UserError):
    """A loader setting that does not fit the data or the processes; the message names the option."""


@dataclass
class TrainBatch:
    images: Optional[torch.Tensor]  # float [b, 3, H, W]; None when the batch holds bad samples
    tokens: Optional[torch.Tensor]  # long [b, context]
    image_index: Optional[torch.Tensor]  # int64 [b]
    text_index: Optional[torch.Tensor]  # int64 [b]
    # With data.on_bad_sample=skip: "shard S, sample key K: reason" of each sample that could not be used.
    # A batch with any is not decoded, and the step is skipped on every process.
    bad: tuple[str, ...] = ()


@dataclass(frozen=True)
class _BadSample:
    """Stands in the stream for a sample that cannot be read or decoded (data.on_bad_sample=skip)."""

    reason: str


def _nearest_lanes(global_batch: int, world_size: int, num_shards: int, wanted: int) -> Optional[int]:
    """The value of data.lanes closest to ``wanted`` that fits (a multiple of the processes that divides the
    global batch, at most the number of shards), or None when none does."""
    fits = [lanes for lanes in range(world_size, min(global_batch, num_shards) + 1, world_size)
            if global_batch % lanes == 0]
    return min(fits, key=lambda lanes: (abs(lanes - wanted), lanes)) if fits else None


def check_layout(data_dir: str | Path, num_shards: int, batch_size: int, world_size: int, workers: int,
                 lanes: Optional[int]) -> int:
    """Every rule that ties data.batch_size, data.lanes, data.workers and the number of processes together,
    checked before anything is built; returns the number of lanes (``lanes``, or its default processes x
    max(workers, 1)). Each message names the keys and a value that would work.

    The rules: the lanes split evenly over the processes and the global batch evenly over the lanes, and
    every lane has a shard. Workers take any share of their process's lanes (see ``worker_lanes``), so their
    number constrains nothing.
    """
    chosen = "data.lanes" if lanes is not None else "data.lanes (default: processes x max(data.workers, 1))"
    lanes = world_size * max(workers, 1) if lanes is None else lanes
    global_batch = batch_size * world_size
    if num_shards < world_size:
        raise LoaderError(f"{data_dir} has {num_shards} shards, fewer than the {world_size} processes: every "
                          f"process needs a shard; prep with a smaller --shard-size")
    ok = lanes >= 1 and lanes % world_size == 0 and global_batch % lanes == 0 and lanes <= num_shards
    if ok:
        return lanes
    if lanes < 1 or lanes % world_size:
        why = f"must be a multiple of the number of processes ({world_size})"
    elif global_batch % lanes:
        why = (f"must divide the global batch, data.batch_size x processes = {batch_size} x {world_size} "
               f"= {global_batch}")
    else:
        why = f"exceeds the {num_shards} shards of {data_dir} (every lane needs a shard)"
    fix = _nearest_lanes(global_batch, world_size, num_shards, lanes)
    hint = (f"; data.lanes={fix} would work" if fix is not None else
            f"; no lane count fits, change data.batch_size (a multiple of {lanes // world_size or 1}) "
            f"or prep with a smaller --shard-size")
    raise LoaderError(f"{chosen} = {lanes} {why}{hint}")


class TrainLoader:
    """Per-process training batches of ``data_dir`` (a prep directory or its URL, several of them, or their
    ``TrainSources``; see the module docstring).

    ``batch_size``, ``workers``, ``background``, ``on_bad_sample``, ``weights`` and ``samples_per_epoch`` are
    the ``data.*`` keys as the config validated them; their defaults are the config's. With ``weights`` an
    epoch is ``samples_per_epoch`` samples drawn from the sources in those proportions
    (``lanes.plan_resampled_epoch``); without, every sample of every source once.
    """

    def __init__(self, data_dir: Location | Sequence[Location] | TrainSources, preprocess: Callable,
                 tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = DataConfig.workers, lanes: Optional[int] = DataConfig.lanes,
                 shuffle_buffer: int = DataConfig.shuffle_buffer, background: Any = DataConfig.background,
                 on_bad_sample: str = DataConfig.on_bad_sample, weights: Optional[Sequence[float]] = None,
                 samples_per_epoch: Optional[int] = None):
        self.sources = data_dir if isinstance(data_dir, TrainSources) else TrainSources(data_dir)
        self.data_dir = self.sources.name
        if (weights is None) != (samples_per_epoch is None) or len(weights or self.sources) != len(self.sources):
            raise LoaderError(f"data.weights ({weights}) and data.samples_per_epoch ({samples_per_epoch}) go together, "
                              f"one weight per source of data.train ({len(self.sources)})")
        self.weights, self.samples_per_epoch = weights, samples_per_epoch
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        if seed < 0:
            raise LoaderError(f"train.seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world size {world_size}")
        if shuffle_buffer < 0:
            raise LoaderError(f"data.shuffle_buffer must be >= 0 (0: no mixing), got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.background = parse_background(background)
        self.skip_bad = on_bad_sample == "skip"
        self.lanes = check_layout(self.data_dir, self.sources.num_shards, batch_size, world_size, workers, lanes)
        # More workers than lanes would leave some idle: each worker reads whole lanes.
        self.workers = min(workers, self.lanes // world_size)
        self.per_lane = self.global_batch_size // self.lanes
        self._plans: dict[int, plan.EpochPlan] = {}
        if self.steps_in_epoch(0) == 0:
            if samples_per_epoch is not None:
                raise LoaderError(f"data.samples_per_epoch: {samples_per_epoch} is fewer than the global batch of "
                                  f"{self.global_batch_size} (data.batch_size x processes): an epoch has no full step")
            raise LoaderError(f"{self.data_dir}: an epoch has no full step: it holds {self.sources.num_samples} "
                              f"samples, fewer than the global batch of {self.global_batch_size}; lower "
                              "data.batch_size")

    @property
    def manifest(self) -> Manifest:
        """The manifest of a single-source loader."""
        if len(self.sources) != 1:
            raise AttributeError("a loader of several sources has no single manifest; see .sources")
        return self.sources.sources[0].manifest

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def check_indices_fit(self, num_images: int, num_texts: int) -> None:
        """Refuse loss state too small for the sources' indices (a larger state is allowed)."""
        m = self.sources
        if m.num_images > num_images or m.num_texts > num_texts:
            raise LoaderError(f"{self.data_dir}: the data has {m.num_images} images and {m.num_texts} captions "
                              f"but the loss state holds {num_images} images and {num_texts} captions")

    def plan(self, epoch: int) -> plan.EpochPlan:
        """The lanes of ``epoch`` (computed once per epoch and process)."""
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            if self.weights is None:
                self._plans[epoch] = plan.plan_epoch(self.sources.shard_sizes, self.lanes, self.per_lane, self.seed,
                                                     epoch)
            else:
                self._plans[epoch] = plan.plan_resampled_epoch(
                    self.sources.source_shard_sizes(), [s.shard_offset for s in self.sources.sources], self.weights,
                    self.samples_per_epoch, self.lanes, self.per_lane, self.seed, epoch)
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of ``epoch``: full global batches, from the manifests (or data.samples_per_epoch) alone, so the
        same on every rank."""
        samples = self.sources.num_samples if self.samples_per_epoch is None else self.samples_per_epoch
        return samples // self.global_batch_size

    def lane_segments(self, epoch: int, lane: int) -> list[tuple[int, int, int]]:
        """(shard, first position, end position) pieces that lane ``lane`` reads in ``epoch``, in order."""
        return self.plan(epoch).lane_segments(lane)

    def worker_lanes(self, worker: int) -> range:
        """The lanes that worker ``worker`` of this rank reads: a contiguous block of the rank's lanes, the
        blocks differing in size by at most one, in worker order (so their pieces concatenate in lane order)."""
        per_rank = self.lanes // self.world_size
        workers = max(self.workers, 1)
        start = self.rank * per_rank
        return range(start + worker * per_rank // workers, start + (worker + 1) * per_rank // workers)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        """The rank's batches of ``epoch`` from step ``start_step`` on (earlier samples are not decoded)."""
        steps = self.steps_in_epoch(epoch)
        pieces = _Pieces(self, epoch, start_step, steps)
        if self.workers == 0:
            for piece in pieces:
                yield _batch([piece])
            return
        loader = DataLoader(pieces, batch_size=None, num_workers=self.workers)
        stream = iter(loader)
        for _ in range(start_step, steps):
            yield _batch([next(stream) for _ in range(self.workers)])

    # --- worker side -------------------------------------------------------------------------------------

    def _lane_items(self, segments: list[tuple[int, int, int]], skip: int
                    ) -> Iterator[tuple[Source, Location, str, dict[str, bytes]]]:
        """(source, shard, key, members) of a lane's items from item ``skip`` on; whole shards before it are
        not opened."""
        for shard, lo, hi in segments:
            if skip >= hi - lo:
                skip -= hi - lo
                continue
            source, info = self.sources.shard(shard)
            location = join_location(source.location, info.name)
            position = lo + skip
            try:
                for _, key, members in shard_samples(location, info, lo + skip, hi):
                    yield source, location, key, members
                    position += 1
            except ShardDataError as exc:
                if not self.skip_bad:
                    raise
                # The shard cannot be read on from here: its remaining samples are all bad, the same ones
                # on every run, so a resumed run skips exactly what this one skipped.
                for missing in range(position, hi):
                    yield source, location, f"{info.first_index + missing:09d}", _BadSample(str(exc))
            skip = 0

    def lane_chunks(self, lane: int, epoch: int, start_step: int, steps: int) -> Iterator[list[RawSample]]:
        """Lane ``lane``'s samples of steps [start_step, steps), ``per_lane`` at a time, undecoded. The items
        of one shuffle block are read in stream order and handed out in the block's order; only the ones
        handed out are parsed."""
        c = self.per_lane
        epoch_plan = self.plan(epoch)
        length = epoch_plan.lane_length(lane)
        blocks = plan.lane_blocks(length, self.shuffle_buffer, self.seed, epoch, lane, start_step * c, steps * c)
        items = None
        chunk: list[RawSample] = []
        for first, size, wanted in blocks:
            if items is None:
                items = self._lane_items(epoch_plan.lane_segments(lane), first)
            want = set(wanted.tolist())
            found: dict[int, RawSample] = {}
            for item in range(first, first + size):
                source, location, key, members = next(items)
                if item in want:
                    found[item] = self._raw(source, location, key, members)
            for item in wanted.tolist():
                chunk.append(found.pop(item))
                if len(chunk) == c:
                    yield chunk
                    chunk = []
        if items is not None:
            items.close()

    def _raw(self, source: Source, location: Location, key: str, members) -> RawSample | _BadSample:
        """The sample checked against its own source's manifest, its indices made global (see
        ``clip_dro.data.sources``)."""
        if isinstance(members, _BadSample):
            return members
        try:
            sample = raw_sample(location, key, members, source.manifest.num_images, source.manifest.num_texts)
        except ShardDataError as exc:
            if not self.skip_bad:
                raise
            return _BadSample(str(exc))
        if source.sample_offset == source.image_offset == source.text_offset == 0:
            return sample
        return replace(sample, index=sample.index + source.sample_offset,
                       image_index=sample.image_index + source.image_offset,
                       text_index=[t + source.text_offset for t in sample.text_index])

    def decode(self, samples: list[RawSample | _BadSample], epoch: int) -> dict[str, Any]:
        """Images through ``preprocess`` (augmentation seeded per sample), one drawn caption each, tokenized.
        With data.on_bad_sample=skip, a piece holding bad samples is reported instead of decoded."""
        bad = [s.reason for s in samples if isinstance(s, _BadSample)]
        if bad:
            return {"bad": tuple(bad)}
        images, captions, text_index = [], [], []
        with torch.random.fork_rng(devices=[]):
            for s in samples:
                choice, augment_seed = plan.sample_draws(self.seed, epoch, s.index, len(s.captions))
                try:
                    image = self._decode_image(s)
                except ShardDataError as exc:
                    if not self.skip_bad:
                        raise
                    bad.append(str(exc))
                    continue
                torch.default_generator.manual_seed(augment_seed)  # CPU only: torch.manual_seed also queues CUDA work
                images.append(self.preprocess(image))
                captions.append(s.captions[choice])
                text_index.append(s.text_index[choice])
        if bad:
            return {"bad": tuple(bad)}
        return {"images": torch.stack(images), "tokens": self.tokenizer(captions),
                "image_index": torch.tensor([s.image_index for s in samples], dtype=torch.int64),
                "text_index": torch.tensor(text_index, dtype=torch.int64)}

    def _decode_image(self, s: RawSample) -> Image.Image:
        try:
            return decode_rgb(s.image, self.background)
        except DECODE_ERRORS as exc:
            raise ShardDataError(f"shard {s.shard}, sample key {s.key}: undecodable image ({exc})") from None


class _Pieces(IterableDataset):
    """One worker's pieces of the steps of an epoch: for each step, its lanes' chunks in lane order."""

    def __init__(self, loader: TrainLoader, epoch: int, start_step: int, steps: int):
        self.loader, self.epoch, self.start_step, self.steps = loader, epoch, start_step, steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        streams = [self.loader.lane_chunks(lane, self.epoch, self.start_step, self.steps)
                   for lane in self.loader.worker_lanes(worker)]
        try:
            for _ in range(self.start_step, self.steps):
                samples = [s for stream in streams for s in next(stream)]
                yield self.loader.decode(samples, self.epoch)
        except UserError as exc:
            # Handed over as a value: raised inside a DataLoader worker it would reach the user wrapped in
            # the worker's traceback instead of as its one-line message.
            yield exc


def _batch(pieces: list) -> TrainBatch:
    failed = next((p for p in pieces if isinstance(p, UserError)), None)
    if failed is not None:
        raise failed
    bad = tuple(reason for p in pieces for reason in p.get("bad", ()))
    if bad:
        return TrainBatch(None, None, None, None, bad)
    if len(pieces) == 1:
        return TrainBatch(**pieces[0])
    return TrainBatch(**{k: torch.cat([p[k] for p in pieces]) for k in pieces[0]})
