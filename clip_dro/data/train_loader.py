"""The training loader: global batches that do not depend on how many processes and workers read them.

Design. The data is read as L *lanes* (``data.lanes``; default processes x max(workers, 1)). In epoch e the
shards are permuted with seed (seed, e) and dealt to the lanes (``lanes.assign_shards``); a lane reads its
shards in that order, each shard's samples in a (seed, e, shard) permutation. At every step each lane gives
its next c = B / L samples (B = per-process batch x processes), and the global batch of step k is lanes
0..L-1 in order. An epoch has as many steps as the shortest lane can fill; the samples left over in the other
lanes are not used in that epoch (the next epoch deals the shards differently). All of this is a function of
the manifest, the seed, L and B only.

Rank r reads lanes [r L/W, (r+1) L/W): its slice of the global batch, in order. With ``workers`` > 0 a torch
DataLoader runs one worker per contiguous sub-block of the rank's lanes; each worker yields its piece of
every step, DataLoader's in-order round robin delivers pieces 0..workers-1 of a step consecutively, and they
are concatenated into the rank's batch. So every shard is read by one (process, worker), and W processes
with batch b see exactly the global batches of one process with batch W b (for the same L: set
``data.lanes`` explicitly to compare runs on different numbers of processes, since its default changes with
them).

Per sample, the caption (one of its captions) and the seed of the random image augmentation are drawn from
(seed, epoch, sample index), so they too are the same whoever reads the sample, and resuming at a step
reproduces the remaining batches.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_dro.data import lanes as plan
from clip_dro.data.shard_reader import RawSample, ShardDataError, read_shard
from clip_dro.errors import UserError
from clip_dro.manifest import Manifest, load_manifest


class LoaderError(UserError):
    """A loader setting that does not fit the data or the processes; the message names the option."""


@dataclass
class TrainBatch:
    images: torch.Tensor  # float [b, 3, H, W]
    tokens: torch.Tensor  # long [b, context]
    image_index: torch.Tensor  # int64 [b]
    text_index: torch.Tensor  # int64 [b]


class TrainLoader:
    """Per-process training batches of ``data_dir`` (see the module docstring for the schedule)."""

    def __init__(self, data_dir: str | Path, preprocess: Callable, tokenizer: Callable[[list[str]], torch.Tensor],
                 batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, workers: int = 0,
                 lanes: Optional[int] = None):
        self.data_dir = Path(data_dir)
        self.manifest: Manifest = load_manifest(self.data_dir)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.streams = world_size * max(workers, 1)
        self.lanes = self.streams if lanes is None else lanes
        self._check()
        self.per_lane = self.global_batch_size // self.lanes
        self.shard_sizes = [s.num_samples for s in self.manifest.shards]
        if self.steps_in_epoch(0) == 0:
            shortest = min(sum(self.shard_sizes[s] for s in lane) for lane in self.lane_assignment(0))
            raise LoaderError(f"{self.data_dir}: an epoch has no full step: a lane holds {shortest} samples, fewer "
                              f"than the {self.per_lane} it must give per step; lower data.batch_size or data.lanes")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _check(self) -> None:
        if self.seed < 0:
            raise LoaderError(f"train.seed must be >= 0, got {self.seed}")
        if self.batch_size < 1:
            raise LoaderError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise LoaderError(f"data.workers must be >= 0, got {self.workers}")
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.lanes < 1 or self.lanes % self.streams:
            raise LoaderError(f"data.lanes = {self.lanes} must be a multiple of processes x max(data.workers, 1) "
                              f"= {self.world_size} x {max(self.workers, 1)}")
        if self.global_batch_size % self.lanes:
            raise LoaderError(f"the global batch, data.batch_size x processes = {self.batch_size} x "
                              f"{self.world_size}, must be divisible by data.lanes = {self.lanes}")
        if len(self.manifest.shards) < self.lanes:
            raise LoaderError(f"{self.data_dir} has {len(self.manifest.shards)} shards, fewer than data.lanes = "
                              f"{self.lanes}: lower data.lanes (or processes x workers) or prep with a smaller "
                              "--shard-size")

    def check_indices_fit(self, num_images: int, num_texts: int) -> None:
        """Refuse loss state too small for the manifest's indices (a larger state is allowed)."""
        m = self.manifest
        if m.num_images > num_images or m.num_texts > num_texts:
            raise LoaderError(f"{self.data_dir}: the manifest has {m.num_images} images and {m.num_texts} captions "
                              f"but the loss state holds {num_images} images and {num_texts} captions")

    def lane_assignment(self, epoch: int) -> list[list[int]]:
        return plan.assign_shards(self.shard_sizes, self.lanes, self.seed, epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of ``epoch``; from the manifest alone, so the same on every rank."""
        return plan.steps_in_epoch(self.shard_sizes, self.lane_assignment(epoch), self.per_lane)

    def worker_lanes(self, worker: int) -> range:
        """The lanes that worker ``worker`` of this rank reads (a contiguous block of the rank's lanes)."""
        per_rank = self.lanes // self.world_size
        per_worker = per_rank // max(self.workers, 1)
        first = self.rank * per_rank + worker * per_worker
        return range(first, first + per_worker)

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

    def lane_chunks(self, lane: int, epoch: int, start_step: int, steps: int) -> Iterator[list[RawSample]]:
        """Lane ``lane``'s samples of steps [start_step, steps), ``per_lane`` at a time, undecoded."""
        c = self.per_lane
        lane_shards = self.lane_assignment(epoch)[lane]
        chunk: list[RawSample] = []
        for shard, positions in plan.lane_segments(lane_shards, self.shard_sizes, self.seed, epoch,
                                                   start_step * c, (steps - start_step) * c):
            info = self.manifest.shards[shard]
            raw = read_shard(self.data_dir / info.name, info, positions, self.manifest.num_images,
                             self.manifest.num_texts)
            for position in positions:
                chunk.append(raw[int(position)])
                if len(chunk) == c:
                    yield chunk
                    chunk = []

    def decode(self, samples: list[RawSample], epoch: int) -> dict[str, torch.Tensor]:
        """Images through ``preprocess`` (augmentation seeded per sample), one drawn caption each, tokenized."""
        images, captions, text_index = [], [], []
        with torch.random.fork_rng(devices=[]):
            for s in samples:
                choice, augment_seed = plan.sample_draws(self.seed, epoch, s.index, len(s.captions))
                try:
                    image = Image.open(io.BytesIO(s.image)).convert("RGB")
                except (OSError, SyntaxError, ValueError) as exc:
                    raise ShardDataError(f"shard {s.shard}, sample key {s.key}: undecodable image ({exc})") from None
                torch.default_generator.manual_seed(augment_seed)  # CPU only: torch.manual_seed also queues CUDA work
                images.append(self.preprocess(image))
                captions.append(s.captions[choice])
                text_index.append(s.text_index[choice])
        return {"images": torch.stack(images), "tokens": self.tokenizer(captions),
                "image_index": torch.tensor([s.image_index for s in samples], dtype=torch.int64),
                "text_index": torch.tensor(text_index, dtype=torch.int64)}


class _Pieces(IterableDataset):
    """One worker's pieces of the steps of an epoch: for each step, its lanes' chunks in lane order."""

    def __init__(self, loader: TrainLoader, epoch: int, start_step: int, steps: int):
        self.loader, self.epoch, self.start_step, self.steps = loader, epoch, start_step, steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        streams = [self.loader.lane_chunks(lane, self.epoch, self.start_step, self.steps)
                   for lane in self.loader.worker_lanes(worker)]
        for _ in range(self.start_step, self.steps):
            samples = [s for stream in streams for s in next(stream)]
            yield self.loader.decode(samples, self.epoch)


def _batch(pieces: list[dict[str, torch.Tensor]]) -> TrainBatch:
    if len(pieces) == 1:
        return TrainBatch(**pieces[0])
    return TrainBatch(**{k: torch.cat([p[k] for p in pieces]) for k in pieces[0]})
