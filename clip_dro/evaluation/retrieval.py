"""Image-text retrieval recall@k with CLIP_benchmark's definitions (design.md §8.1), in bounded memory.

* ``i2t_R@k``: an image query is a hit if **any** of its captions is among the k most similar captions.
* ``t2i_R@k``: a caption query is a hit if its image is among the k most similar images.
* ``r_mean``: the mean of the six recalls (k = 1, 5, 10). All values are percentages.

"Among the k most similar" follows :mod:`clip_dro.evaluation.ranking` (descending score, ties to the lower
index). An image without captions counts as a miss, as CLIP_benchmark's 0/0 recall does.
Scores are computed in blocks of ``block_size`` queries x ``chunk_size`` candidates
(:func:`~clip_dro.evaluation.ranking.chunked_best_positive_rank`), never the whole image-caption matrix nor a
whole row of it: the working memory (about 12 bytes per score of a block: 25 MB at the defaults) does not grow
with the number of images or captions.
"""
from __future__ import annotations

import torch

from clip_dro.evaluation.ranking import chunked_best_positive_rank, group_positives

RECALL_KS = (1, 5, 10)
BLOCK_SIZE = 512  # queries scored together
CHUNK_SIZE = 4096  # candidates scored together


def _ranks(queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, block_size: int,
           chunk_size: int) -> torch.Tensor:
    """Best-positive rank of every query; ``positives`` [Q, P] as in :func:`chunked_best_positive_rank`."""
    return torch.cat([chunked_best_positive_rank(queries[start:start + block_size], candidates,
                                                 positives[start:start + block_size], chunk_size)
                      for start in range(0, len(queries), block_size)])


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    block_size: int = BLOCK_SIZE, chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The best-positive rank of every image query (i2t) [N] and every caption query (t2i) [M], from
    L2-normalized ``image_features`` [N, d], ``text_features`` [M, d] and ``text_to_image`` [M] (the row of
    each caption's image in ``image_features``). A query is a hit at k when its rank is below k."""
    image_features = image_features.float()
    text_features = text_features.float().to(image_features.device)
    text_to_image = text_to_image.long().to(image_features.device)
    i2t = _ranks(image_features, text_features, group_positives(text_to_image, len(image_features)), block_size,
                 chunk_size)
    t2i = _ranks(text_features, image_features, text_to_image[:, None], block_size, chunk_size)
    return i2t, t2i


def recall_metrics(i2t: torch.Tensor, t2i: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways and ``r_mean`` from the ranks of :func:`retrieval_ranks`."""
    metrics = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{name}_R@{k}"] = 100.0 * (ranks < k).sum().item() / len(ranks)
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    return metrics


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = RECALL_KS, block_size: int = BLOCK_SIZE,
                      chunk_size: int = CHUNK_SIZE) -> dict[str, float]:
    """Recall@k both ways from features as in :func:`retrieval_ranks`."""
    return recall_metrics(*retrieval_ranks(image_features, text_features, text_to_image, block_size, chunk_size), ks)
