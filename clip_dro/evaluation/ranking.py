"""The rank of the best positive of a query: the one ordering rule behind every recall@k and accuracy@k.

Candidates are ordered by descending score, ties broken by the lower candidate index (a stable descending
sort). A query is a hit at k when a positive is among the first k candidates of that order. This is the
top-k of CLIP_benchmark (``torch.topk``) with its unspecified order of tied scores made deterministic.
Scores must be finite: no candidate scores above a NaN, so a NaN positive would rank first and score 100.

The rank is a count of the candidates that come before the best positive, so it adds up over any split of
the candidates into chunks once that positive's score is known: :func:`chunked_best_positive_rank` never holds
more than one chunk of scores, however many candidates there are.
"""
from __future__ import annotations

import torch

NO_POSITIVE = torch.iinfo(torch.int64).max
PAD = -1


def _refuse_non_finite(scores: torch.Tensor) -> None:
    if not torch.isfinite(scores).all():
        raise ValueError(f"{int((~torch.isfinite(scores)).any(dim=1).sum())} of {len(scores)} queries have "
                         "non-finite scores (NaN or inf): their ranks would be meaningless")


def _best_positive(scores: torch.Tensor, positives: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For scores [Q, W] of the candidates ``start`` .. ``start + W - 1``: each query's highest score among its
    positives in that range, and the lowest index among the positives with that score (-inf and
    :data:`NO_POSITIVE` for a query without positives there). Read from ``scores`` itself, so that ties with
    the best positive compare exactly."""
    width = scores.shape[1]
    inside = (positives >= start) & (positives < start + width)  # PAD is outside every range
    positive_scores = scores.gather(1, (positives - start).clamp(0, width - 1)).masked_fill(~inside, float("-inf"))
    best = positive_scores.max(dim=1).values
    first = positives.masked_fill(~inside | (positive_scores != best[:, None]), NO_POSITIVE).min(dim=1).values
    return best, first


def _merge(best: torch.Tensor, first: torch.Tensor, other_best: torch.Tensor, other_first: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The best positive of the union of two candidate ranges, from each range's (:func:`_best_positive`)."""
    merged = torch.maximum(best, other_best)
    none = torch.full_like(first, NO_POSITIVE)
    return merged, torch.minimum(torch.where(best == merged, first, none),
                                 torch.where(other_best == merged, other_first, none))


def _count_before(scores: torch.Tensor, best: torch.Tensor, first: torch.Tensor, start: int) -> torch.Tensor:
    """How many of the candidates ``start`` .. of ``scores`` [Q, W] come before each query's best positive
    (score ``best``, index ``first``): those scoring higher, and those scoring equal at a lower index."""
    index = torch.arange(start, start + scores.shape[1], device=scores.device)
    before = scores > best[:, None]
    before |= (scores == best[:, None]) & (index < first[:, None])
    # int32: summing booleans into the default int64 would first copy them all into int64 (8 bytes a score)
    return before.sum(dim=1, dtype=torch.int32).long()


def _without_positives(rank: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    return torch.where((positives != PAD).any(dim=1), rank, torch.full_like(rank, NO_POSITIVE))


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked positive under the rule above.

    ``scores`` [Q, C] float; ``positives`` [Q, P] int64, the candidate indices of each query's positives,
    padded with ``PAD``. A query without positives gets :data:`NO_POSITIVE`, a rank beyond every k.

    No sort and no [Q, C] mask of positives: the best-ranked positive is the highest-scoring one (the lowest
    index among equals), read from ``scores`` itself so that ties with it compare exactly, and its rank
    counts the candidates that come before it. Non-finite scores are a ValueError (see the module docstring).
    """
    _refuse_non_finite(scores)
    if scores.shape[1] == 0:
        return _without_positives(torch.zeros(len(scores), dtype=torch.long, device=scores.device), positives)
    best, first = _best_positive(scores, positives, 0)
    return _without_positives(_count_before(scores, best, first, 0), positives)


def _chunks(first_positive: int, num_candidates: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering the candidates: from the first positive to the end, then the ones before
    it, ``chunk_size`` at most each (so that positives held together fall in as few chunks as possible)."""
    return ([(s, min(s + chunk_size, num_candidates)) for s in range(first_positive, num_candidates, chunk_size)]
            + [(s, min(s + chunk_size, first_positive)) for s in range(0, first_positive, chunk_size)])


def chunked_best_positive_rank(queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor,
                               chunk_size: int) -> torch.Tensor:
    """:func:`best_positive_rank` of the scores ``queries @ candidates.T`` ([Q, d] and [C, d]), computed
    ``chunk_size`` candidates at a time: at most one [Q, chunk_size] block of scores exists at once.

    First the chunks that hold positives give each query's best positive, then every chunk counts the
    candidates before it. Each score a comparison uses comes from the very product it is compared with: the
    last chunk of the first pass is counted as it is, and a chunk computed in both passes is the same product
    of the same tensors both times (a deterministic result), so ties compare exactly as in one product.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    valid = positives != PAD
    first_positive = int(positives[valid].min()) if bool(valid.any()) else 0
    chunks = _chunks(first_positive, len(candidates), chunk_size)
    holding = [(start, stop) for start, stop in chunks if bool(((positives >= start) & (positives < stop)).any())]

    def scores_of(start: int, stop: int) -> torch.Tensor:
        scores = queries @ candidates[start:stop].T
        _refuse_non_finite(scores)
        return scores

    best = torch.full((len(queries),), float("-inf"), dtype=queries.dtype, device=queries.device)
    first = torch.full((len(queries),), NO_POSITIVE, dtype=torch.long, device=queries.device)
    scores = None
    for start, stop in holding:
        scores = scores_of(start, stop)
        best, first = _merge(best, first, *_best_positive(scores, positives, start))
    rank = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    if holding:
        rank += _count_before(scores, best, first, holding[-1][0])
    del scores
    for start, stop in chunks:
        if not holding or (start, stop) != holding[-1]:
            rank += _count_before(scores_of(start, stop), best, first, start)
    return _without_positives(rank, positives)


def group_positives(owner: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[num_groups, P] the indices i with ``owner[i] == g`` for each group g, ascending, padded with ``PAD``
    (P = the largest group). E.g. the captions of each image from each caption's image."""
    owner = owner.long()
    counts = torch.bincount(owner, minlength=num_groups)
    width = max(int(counts.max()), 1) if len(owner) else 1
    order = torch.argsort(owner, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(owner), device=owner.device) - start[owner[order]]
    grouped = torch.full((num_groups, width), PAD, dtype=torch.long, device=owner.device)
    grouped[owner[order], slot] = order
    return grouped
