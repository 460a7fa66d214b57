"""Retrieval ranks computed a chunk of candidates at a time: the same ranks, ties included, as one score matrix,
and working memory that does not grow with the number of captions."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clip_dro.evaluation.ranking import (NO_POSITIVE, PAD, best_positive_rank, chunked_best_positive_rank,
                                         group_positives)
from clip_dro.evaluation.retrieval import retrieval_metrics, retrieval_ranks


def _tied(seed: int, num_images: int, num_captions: int, shuffled: bool) -> tuple[torch.Tensor, ...]:
    """Small-integer embeddings: every dot product is exact whatever the order of its sum, so one score matrix
    and its chunks hold the very same values, and ties are everywhere. Captions per image vary (some images have
    none); ``shuffled`` scatters an image's captions instead of keeping them together."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(-1, 2, (num_images, 4), generator=g).float()
    text_to_image = torch.randint(0, num_images - 2, (num_captions,), generator=g)  # the last two: no captions
    if not shuffled:
        text_to_image = text_to_image.sort().values
    texts = images[text_to_image] + torch.randint(-1, 2, (num_captions, 4), generator=g).float()
    return images, texts, text_to_image


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_ranks_equal_those_of_one_score_matrix_with_ties(seed, shuffled):
    images, texts, text_to_image = _tied(seed, 19, 61, shuffled)
    assert len((images @ texts.T).unique()) < 20  # ties everywhere
    i2t_positives = group_positives(text_to_image, len(images))
    t2i_positives = text_to_image[:, None]
    want_i2t = best_positive_rank(images @ texts.T, i2t_positives)
    want_t2i = best_positive_rank(texts @ images.T, t2i_positives)
    assert (want_i2t == NO_POSITIVE).sum() == 2 and (want_i2t > 0).any() and (want_t2i > 0).any()
    for chunk_size in (1, 2, 3, 7, 18, 19, 60, 61, 100):
        assert torch.equal(chunked_best_positive_rank(images, texts, i2t_positives, chunk_size), want_i2t), chunk_size
        assert torch.equal(chunked_best_positive_rank(texts, images, t2i_positives, chunk_size), want_t2i), chunk_size
    for block_size, chunk_size in ((1, 1), (4, 5), (512, 4096)):
        i2t, t2i = retrieval_ranks(images, texts, text_to_image, block_size=block_size, chunk_size=chunk_size)
        assert torch.equal(i2t, want_i2t) and torch.equal(t2i, want_t2i), (block_size, chunk_size)


def test_chunks_split_a_tie_with_the_best_positive():
    """A candidate tied with the best positive comes before it only at a lower index, whichever chunk either is
    in; the best positive is the lowest-indexed of tied positives."""
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.9]])
    queries, candidates = scores, torch.eye(6)  # queries @ candidates.T == scores
    for positives, rank in (([[3]], 1), ([[5, 3]], 1), ([[1]], 0), ([[4, 2]], 4), ([[2, 0, PAD]], 3), ([[PAD]], None)):
        positives = torch.tensor(positives)
        want = best_positive_rank(scores, positives)
        assert want.item() == (NO_POSITIVE if rank is None else rank)
        for chunk_size in range(1, 8):
            assert chunked_best_positive_rank(queries, candidates, positives, chunk_size).item() == want.item()


def test_chunked_ranks_refuse_non_finite_scores():
    images, texts = torch.eye(3), torch.eye(3)
    images[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite scores"):
        chunked_best_positive_rank(images, texts, torch.arange(3)[:, None], chunk_size=1)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        chunked_best_positive_rank(images, texts, torch.arange(3)[:, None], chunk_size=0)


class _LargestNewTensor(TorchDispatchMode):
    """The bytes of the largest tensor any torch operation creates (a view of an existing one does not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest_tensor(num_captions: int, block_size: int, chunk_size: int) -> tuple[int, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    text_to_image = torch.arange(num_captions) * 300 // num_captions
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.3 * torch.randn(num_captions, 32, generator=g),
                                          dim=1)
    with _LargestNewTensor() as spy:
        metrics = retrieval_metrics(images, texts, text_to_image, block_size=block_size, chunk_size=chunk_size)
    return spy.largest, metrics


def test_working_memory_is_bounded_as_captions_grow():
    """The largest tensor made while ranking is one block x chunk of float32 scores, at 1,500 captions as at four
    times as many (the per-query vectors, 8 bytes a caption, stay below it here). Unchunked, a block of
    queries x all captions would be the largest."""
    block, chunk = 64, 256
    for captions in (1500, 6000):
        largest, metrics = _largest_tensor(captions, block, chunk)
        assert largest == block * chunk * 4, (captions, largest)
        assert 0 < metrics["t2i_R@1"] < 100
    rows_of_all_captions, _ = _largest_tensor(6000, block, chunk_size=6000)
    assert rows_of_all_captions == block * 6000 * 4
