"""The training schedule as pure functions of (manifest shard sizes, seed, epoch, lanes): which shards each
lane streams in an epoch, in what sample order, and which sample draws (caption, augmentation) it makes.

Nothing here depends on the number of processes or workers; that is what makes the global batch of a step
the same set of samples however the work is split (see ``train_loader``).
"""
from __future__ import annotations

import numpy as np

# Distinct first words keep the random streams apart (seed, epoch, ... alone could coincide).
_TAG_SHARDS, _TAG_SAMPLES, _TAG_DRAWS = 1, 2, 3


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def assign_shards(shard_sizes: list[int], lanes: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard ids of each lane for ``epoch``: shards in a (seed, epoch) permutation, each given to the lane
    holding the fewest samples so far (lowest lane on ties). Deterministic, and the lanes' lengths differ by
    at most one shard, so few samples are left over."""
    totals = [0] * lanes
    assignment: list[list[int]] = [[] for _ in range(lanes)]
    for shard in _rng(_TAG_SHARDS, seed, epoch).permutation(len(shard_sizes)):
        lane = min(range(lanes), key=lambda p: (totals[p], p))
        assignment[lane].append(int(shard))
        totals[lane] += shard_sizes[shard]
    return assignment


def steps_in_epoch(shard_sizes: list[int], assignment: list[list[int]], per_lane: int) -> int:
    """Steps every lane can fill with ``per_lane`` samples; the rest of the epoch's samples are not used."""
    return min(sum(shard_sizes[s] for s in lane) for lane in assignment) // per_lane


def sample_order(num_samples: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """Positions within ``shard`` in the order the lane reads them in ``epoch``."""
    return _rng(_TAG_SAMPLES, seed, epoch, shard).permutation(num_samples)


def lane_segments(lane: list[int], shard_sizes: list[int], seed: int, epoch: int, start: int, count: int
                  ) -> list[tuple[int, np.ndarray]]:
    """(shard, positions) pieces covering items [start, start + count) of a lane's stream in ``epoch``.

    The skipped prefix costs nothing: whole shards are skipped by their counts and the positions of a
    partly skipped shard are cut before anything is read.
    """
    segments = []
    for shard in lane:
        if count <= 0:
            break
        size = shard_sizes[shard]
        if start >= size:
            start -= size
            continue
        positions = sample_order(size, seed, epoch, shard)[start:start + count]
        segments.append((shard, positions))
        count -= len(positions)
        start = 0
    return segments


def sample_draws(seed: int, epoch: int, index: int, num_captions: int) -> tuple[int, int]:
    """(caption choice, augmentation seed) of sample ``index`` in ``epoch``: fixed per sample, whoever reads it."""
    rng = _rng(_TAG_DRAWS, seed, epoch, index)
    return int(rng.integers(num_captions)), int(rng.integers(2**62))
