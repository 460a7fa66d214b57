"""The rank of the best positive of a query: the one ordering rule behind every recall@k and accuracy@k.

Candidates are ordered by descending score, ties broken by the lower candidate index (a stable descending
sort). A query is a hit at k when a positive is among the first k candidates of that order. This is the
top-k of CLIP_benchmark (``torch.topk``) with its unspecified order of tied scores made deterministic.
"""
from __future__ import annotations

import torch


def best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked positive under the rule above.

    ``scores`` [Q, C] float, ``positive`` [Q, C] bool. A query without positives gets rank C (never a hit).
    Costs a few [Q, C] element-wise passes and no sort: the best-ranked positive is the highest-scoring one,
    the lowest index among equals, and its rank counts the candidates that come before it.
    """
    num_candidates = scores.shape[1]
    masked = scores.masked_fill(~positive, float("-inf"))
    best_score = masked.max(dim=1, keepdim=True).values
    candidates = torch.arange(num_candidates, device=scores.device)
    # Index of the first positive attaining the best score (argmax returns the first of equal maxima).
    first_best = (positive & (masked == best_score)).to(torch.uint8).argmax(dim=1, keepdim=True)
    before = (scores > best_score) | ((scores == best_score) & (candidates < first_best))
    rank = before.sum(dim=1)
    return torch.where(positive.any(dim=1), rank, torch.full_like(rank, num_candidates))
