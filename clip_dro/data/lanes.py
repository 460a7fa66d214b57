"""The training schedule as pure functions of (manifest shard sizes, seed, epoch, lanes, per-lane count,
shuffle buffer): which samples each lane streams in an epoch, in what order, and which sample draws
(caption, augmentation) it makes.

Epoch e: the shards are permuted with (seed, e) and laid end to end, each shard's samples in file order,
into one sequence of N items. The sequence is cut into L contiguous lane ranges, each holding at least
``steps x per_lane`` items with steps = N // (L x per_lane), so every sample is used once in the epoch but for
fewer than one global batch. A cut falls on a shard boundary whenever the slack allows it (always when the
shards divide evenly over the lanes); otherwise the two neighbouring lanes read disjoint parts of that shard.
Within a lane, consecutive blocks of ``buffer`` items are each permuted with (seed, e, lane, block): a
shuffle buffer whose order is computed, not replayed, so a resumed epoch skips its prefix without reading it
(except within the block it resumes in).

With several sources the shards are those of all sources together (``clip_dro.data.sources``). With
``data.weights`` the epoch is virtual instead (``plan_resampled_epoch``): ``data.samples_per_epoch`` items,
each source's share of them drawn as whole shards with replacement from (seed, e, source), the draws
permuted with (seed, e) and cut into lanes the same way.

The cost per epoch is one permutation and one cumulative sum over the shards (numpy) and a binary search
per lane: O(shards + lanes log shards). Nothing here depends on the number of processes or workers; that is
what makes the global batch of a step the same whoever reads it (see ``train_loader``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# Distinct first words keep the random streams apart (seed, epoch, ... alone could coincide).
_TAG_SHARDS, _TAG_BLOCKS, _TAG_DRAWS, _TAG_RESAMPLE, _TAG_VISITS = 1, 4, 3, 5, 6


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class EpochPlan:
    """The lanes of one epoch: ``order`` (shard ids in epoch order; a shard drawn twice is there twice),
    ``offsets`` (item offset of each of them in the epoch's sequence, plus the total), ``cuts`` (the lanes'
    item ranges: lane l holds [cuts[l], cuts[l + 1])) and ``steps`` (full global batches in the epoch)."""

    order: np.ndarray
    offsets: np.ndarray
    cuts: np.ndarray
    steps: int
    per_lane: int

    @property
    def lanes(self) -> int:
        return len(self.cuts) - 1

    def lane_length(self, lane: int) -> int:
        return int(self.cuts[lane + 1] - self.cuts[lane])

    def lane_segments(self, lane: int) -> list[tuple[int, int, int]]:
        """(shard, first position, end position) pieces of lane ``lane``'s range, in stream order."""
        a, b = int(self.cuts[lane]), int(self.cuts[lane + 1])
        first = max(int(np.searchsorted(self.offsets, a, side="right")) - 1, 0)
        end = min(int(np.searchsorted(self.offsets, b, side="left")), len(self.order))
        starts, stops = self.offsets[first:end], self.offsets[first + 1:end + 1]
        lo, hi = np.maximum(starts, a) - starts, np.minimum(stops, b) - starts
        keep = hi > lo
        return list(zip(self.order[first:end][keep].tolist(), lo[keep].tolist(), hi[keep].tolist()))


def plan_epoch(shard_sizes: Sequence[int] | np.ndarray, lanes: int, per_lane: int, seed: int, epoch: int
               ) -> EpochPlan:
    """The lanes of ``epoch``: every shard once (see the module docstring)."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    order = _rng(_TAG_SHARDS, seed, epoch).permutation(len(sizes))
    return _cut(order, sizes[order], lanes, per_lane)


def plan_resampled_epoch(source_shard_sizes: Sequence[np.ndarray], shard_offsets: Sequence[int],
                         weights: Sequence[float], samples: int, lanes: int, per_lane: int, seed: int, epoch: int
                         ) -> EpochPlan:
    """The lanes of a virtual epoch of ``samples`` items drawn from several sources (open_clip's resampled
    mode): source k gets its share ``weights[k] / sum(weights)`` of them exactly (largest remainders), as
    shards of that source drawn uniformly with replacement (so each of its samples is equally likely) until
    the share is covered, the last one cut to fit. The visits of all sources are permuted with (seed, epoch)
    and cut into lanes as in ``plan_epoch``; a visit is a shard's prefix, so lane segments address it as
    they do a shard. Source k's shard j is global shard ``shard_offsets[k] + j``."""
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * samples
    quota = np.floor(share).astype(np.int64)
    quota[np.argsort(-(share - quota), kind="stable")[:samples - int(quota.sum())]] += 1
    shards, sizes = [], []
    for k, (source_sizes, offset) in enumerate(zip(source_shard_sizes, shard_offsets)):
        if quota[k] == 0:
            continue
        readable = np.flatnonzero(source_sizes > 0)
        # Enough draws to cover the quota even if every one is the smallest shard.
        draws = readable[_rng(_TAG_RESAMPLE, seed, epoch, k).integers(
            len(readable), size=-(-int(quota[k]) // int(source_sizes[readable].min())))]
        covered = np.cumsum(source_sizes[draws])
        used = int(np.searchsorted(covered, quota[k], side="left")) + 1
        visit_sizes = source_sizes[draws[:used]].copy()
        visit_sizes[-1] -= int(covered[used - 1] - quota[k])
        shards.append(draws[:used] + offset)
        sizes.append(visit_sizes)
    order = np.concatenate(shards)
    permutation = _rng(_TAG_VISITS, seed, epoch).permutation(len(order))
    return _cut(order[permutation], np.concatenate(sizes)[permutation], lanes, per_lane)


def _cut(order: np.ndarray, sizes: np.ndarray, lanes: int, per_lane: int) -> EpochPlan:
    """Shard visits ``order`` of ``sizes`` items each, laid end to end and cut into lanes."""
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    steps = total // (lanes * per_lane)
    need = steps * per_lane
    cuts = np.zeros(lanes + 1, dtype=np.int64)
    cuts[-1] = total
    for lane in range(lanes - 1):
        want = int(cuts[lane]) + need
        limit = total - (lanes - 1 - lane) * need  # what the lanes after this one need
        boundary = int(offsets[min(int(np.searchsorted(offsets, want, side="left")), len(order))])
        cuts[lane + 1] = boundary if want <= boundary <= limit else want
    return EpochPlan(order, offsets, cuts, steps, per_lane)


def lane_blocks(length: int, buffer: int, seed: int, epoch: int, lane: int, start: int, stop: int
                ) -> Iterator[tuple[int, int, np.ndarray]]:
    """The shuffle blocks of a lane of ``length`` items that outputs [start, stop) of its stream fall in:
    (first item of the block, items in it, the block's items for those outputs in output order)."""
    block = max(buffer, 1)
    for b in range(start // block, -(-stop // block)):
        first = b * block
        size = min(block, length - first)
        order = _rng(_TAG_BLOCKS, seed, epoch, lane, b).permutation(size) if block > 1 else np.arange(size)
        lo, hi = max(start, first) - first, min(stop, first + size) - first
        yield first, size, first + order[lo:hi]


def sample_draws(seed: int, epoch: int, index: int, num_captions: int) -> tuple[int, int]:
    """(caption choice, augmentation seed) of sample ``index`` in ``epoch``: fixed per sample, whoever reads it."""
    rng = _rng(_TAG_DRAWS, seed, epoch, index)
    return int(rng.integers(num_captions)), int(rng.integers(2**62))
