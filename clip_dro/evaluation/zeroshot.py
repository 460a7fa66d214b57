"""Zero-shot classification with CLIP_benchmark's definitions (design.md §8.2).

A class embedding is the normalized mean of the normalized embeddings of its prompts (every template filled
with the class name): open_clip's ``build_zero_shot_classifier`` computes exactly that. An image's logits are
its cosine similarities to the class embeddings.

Metrics, in percent: ``acc1`` and ``acc5`` (the true class among the top 1 / 5 classes, ties ordered as in
:mod:`clip_dro.evaluation.ranking`; ``acc5`` is left out for fewer than 5 classes, where CLIP_benchmark
reports NaN) and ``mean_per_class_recall`` (balanced accuracy: the mean over the classes present in the labels of
the fraction of their images classified correctly at top 1).
"""
from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch

from clip_dro.evaluation.ranking import best_positive_rank


# Prompts encoded together, whole classes at a time: on a CPU larger text batches ran slower per prompt (1,000
# classes × 80 templates, 10 classes per forward: 1.8× the time of CLIP_benchmark's one class per forward).
PROMPTS_PER_FORWARD = 128


def classes_per_forward(num_templates: int) -> int:
    """How many classes' prompts one forward pass of the text tower encodes."""
    return max(1, PROMPTS_PER_FORWARD // num_templates)


def zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence[Callable[[str], str]], device: torch.device | str) -> torch.Tensor:
    """Class embeddings [d, C] (columns L2-normalized) from prompts ``template(classname)``."""
    return open_clip.build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                                num_classes_per_batch=classes_per_forward(len(templates)),
                                                device=device,
                                                use_tqdm=False).float()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` from ``logits`` [N, C] and integer ``labels`` [N]."""
    num_classes = logits.shape[1]
    labels = labels.long().to(logits.device)
    rank = best_positive_rank(logits.float(), labels[:, None])
    correct = (rank < 1).double()
    count = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    present = count > 0
    per_class = hits[present] / count[present]
    metrics = {"acc1": 100.0 * (rank < 1).sum().item() / len(rank)}
    if num_classes >= 5:
        metrics["acc5"] = 100.0 * (rank < 5).sum().item() / len(rank)
    metrics["mean_per_class_recall"] = 100.0 * per_class.mean().item()
    return metrics


def top1_predictions(logits: torch.Tensor) -> torch.Tensor:
    """Each image's top-1 class under the ranking rule (ties to the lower index: ``argmax`` returns the first
    maximum), the class ``acc1`` counts."""
    return logits.argmax(dim=1)
