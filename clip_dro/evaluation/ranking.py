"""The rank of the best positive of a query: the one ordering rule behind every recall@k and accuracy@k.

Candidates are ordered by descending score, ties broken by the lower candidate index (a stable descending
sort). A query is a hit at k when a positive is among the first k candidates of that order. This is the
top-k of CLIP_benchmark (``torch.topk``) with its unspecified order of tied scores made deterministic.
Scores must be finite: no candidate scores above a NaN, so a NaN positive would rank first and score 100.
"""
from __future__ import annotations

import torch

NO_POSITIVE = torch.iinfo(torch.int64).max
PAD = -1


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked positive under the rule above.

    ``scores`` [Q, C] float; ``positives`` [Q, P] int64, the candidate indices of each query's positives,
    padded with ``PAD``. A query without positives gets :data:`NO_POSITIVE`, a rank beyond every k.

    No sort and no [Q, C] mask of positives: the best-ranked positive is the highest-scoring one (the lowest
    index among equals), read from ``scores`` itself so that ties with it compare exactly, and its rank
    counts the candidates that come before it. Non-finite scores are a ValueError (see the module docstring).
    """
    if not torch.isfinite(scores).all():
        raise ValueError(f"{int((~torch.isfinite(scores)).any(dim=1).sum())} of {len(scores)} queries have "
                         "non-finite scores (NaN or inf): their ranks would be meaningless")
    num_candidates = scores.shape[1]
    valid = positives != PAD
    positive_scores = scores.gather(1, positives.clamp(min=0)).masked_fill(~valid, float("-inf"))
    best = positive_scores.max(dim=1, keepdim=True).values
    first = positives.masked_fill(~valid | (positive_scores != best), num_candidates).min(dim=1, keepdim=True).values
    candidates = torch.arange(num_candidates, device=scores.device)
    rank = (scores > best).sum(dim=1) + ((scores == best) & (candidates < first)).sum(dim=1)
    return torch.where(valid.any(dim=1), rank, torch.full_like(rank, NO_POSITIVE))


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
