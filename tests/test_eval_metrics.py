"""Retrieval and zero-shot metrics against brute-force computations written here."""
import pytest
import torch
import torch.nn.functional as F

from clip_dro.evaluation.ranking import NO_POSITIVE, PAD, best_positive_rank, group_positives
from clip_dro.evaluation.retrieval import retrieval_metrics
from clip_dro.evaluation.zeroshot import classification_metrics, zero_shot_classifier
from clip_dro.models import build_model
from evalgen import brute_force_classification, brute_force_retrieval


def _tied_set(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Small-integer embeddings (exact dot products), many exact ties, 1-4 captions per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(-1, 2, (23, 3), generator=g).float()
    text_to_image = [i for i in range(23) for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
    texts = images[text_to_image] + torch.randint(-1, 2, (len(text_to_image), 3), generator=g).float()
    return images, texts, text_to_image


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [1, 5, 512])
def test_retrieval_matches_brute_force_with_ties(seed, block_size):
    images, texts, text_to_image = _tied_set(seed)
    sim = images @ texts.T
    assert len(sim.flatten().unique()) < sim.numel() / 4  # ties are everywhere
    got = retrieval_metrics(images, texts, torch.tensor(text_to_image), block_size=block_size)
    want = brute_force_retrieval(images, texts, text_to_image)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_retrieval_matches_clip_benchmark_formula_without_ties():
    """CLIP_benchmark: torch.topk over the score matrix, one-hot positives, hit if any positive in the top k."""
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    text_to_image = torch.arange(40).repeat_interleave(torch.randint(1, 6, (40,), generator=g))
    texts = F.normalize(images[text_to_image] + torch.randn(len(text_to_image), 16, generator=g), dim=-1)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True
    got = retrieval_metrics(images, texts, text_to_image, block_size=7)
    for k in (1, 5, 10):
        for name, s, p in (("t2i", scores, positive), ("i2t", scores.T, positive.T)):
            top = torch.topk(s, k, dim=1).indices
            hits = (F.one_hot(top, s.shape[1]) * p[:, None, :]).sum(dim=(1, 2)) > 0
            assert got[f"{name}_R@{k}"] == pytest.approx(100 * hits.double().mean().item(), abs=1e-9)
    assert 0 < got["t2i_R@1"] < got["t2i_R@10"] < 100


def test_rank_rule_on_a_hand_example():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    # Order: 1 (0.9), 3 (0.9), 0 (0.5), 2 (0.5), 4.
    assert best_positive_rank(scores, torch.tensor([[3]])).item() == 1
    assert best_positive_rank(scores, torch.tensor([[4, 2]])).item() == 3
    assert best_positive_rank(scores, torch.tensor([[2, 0, PAD]])).item() == 2
    assert best_positive_rank(scores, torch.tensor([[PAD]])).item() == NO_POSITIVE


def test_group_positives():
    owner = torch.tensor([2, 0, 2, 2, 0, 4])
    assert group_positives(owner, 5).tolist() == [[1, 4, PAD], [PAD] * 3, [0, 2, 3], [PAD] * 3, [5, PAD, PAD]]


def test_image_without_captions_is_a_miss():
    images = torch.eye(3)
    texts = torch.eye(3)[:2]
    got = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert got["i2t_R@10"] == pytest.approx(200 / 3)
    assert got["t2i_R@1"] == 100


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 4, (60, 8), generator=g).float()  # ties everywhere
    labels = torch.randint(0, 7, (60,), generator=g)  # class 7 absent: not part of the per-class mean
    labels[:3] = 0  # unbalanced
    got = classification_metrics(logits, labels)
    want = brute_force_classification(logits, labels)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["acc1"] != pytest.approx(got["mean_per_class_recall"])


def test_classification_with_fewer_than_five_classes_has_no_acc5():
    got = classification_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 1, 0]))
    assert got == pytest.approx({"acc1": 200 / 3, "mean_per_class_recall": 75.0})


def test_zero_shot_classifier_is_normalized_mean_of_normalized_prompts():
    torch.manual_seed(0)
    bundle = build_model("tiny-vit").model.eval(), build_model("tiny-vit").tokenizer
    model, tokenizer = bundle
    classnames = ["cat", "dog", "red bird"]
    templates = ["a photo of a {c}.", "{c}", "a drawing of the {c}"]
    got = zero_shot_classifier(model, tokenizer, classnames, [lambda c, t=t: t.replace("{c}", c) for t in templates],
                               "cpu")
    with torch.no_grad():
        want = []
        for name in classnames:
            emb = model.encode_text(tokenizer([t.replace("{c}", name) for t in templates]))
            mean = F.normalize(emb, dim=-1).mean(dim=0)
            want.append(mean / mean.norm())
    assert got.shape == (128, 3)
    torch.testing.assert_close(got, torch.stack(want, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_ranking_refuses_non_finite_scores(bad):
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.3, 0.4]])
    assert best_positive_rank(scores, torch.tensor([[0], [2]])).tolist() == [1, 0]
    scores[0, 0] = bad
    with pytest.raises(ValueError, match="1 of 2 queries have non-finite scores"):
        best_positive_rank(scores, torch.tensor([[0], [2]]))


def test_metrics_refuse_nan_embeddings_instead_of_scoring_100():
    images, texts = torch.eye(3), torch.eye(3)
    images[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(images, texts, torch.arange(3))
    logits = torch.full((4, 5), float("nan"))
    with pytest.raises(ValueError, match="4 of 4 queries"):
        classification_metrics(logits, torch.tensor([0, 1, 2, 3]))
