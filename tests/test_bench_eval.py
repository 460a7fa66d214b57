"""The evaluation-speed bench case (issue 20): its baseline is CLIP_benchmark's own computation, and the case
runs at a tiny size with every field it reports (timings are never asserted)."""
from __future__ import annotations

import pytest
import torch

from clip_dro.bench.eval_speed import bench_eval_speed, clip_benchmark_recalls, retrieval_embeddings
from clip_dro.evaluation.retrieval import retrieval_metrics

zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


class _Embeddings(torch.nn.Module):
    """A model whose encoders return stored embeddings: an image is its row index, a caption its text index."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        super().__init__()
        self.images, self.texts = images, texts

    def encode_image(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]

    def encode_text(self, index: torch.Tensor) -> torch.Tensor:
        return self.texts[index]


def test_the_baseline_is_clip_benchmarks_evaluate_and_agrees_with_ours():
    images, texts, text_to_image = retrieval_embeddings(60, 180, 32, seed=1)
    samples = [(torch.tensor(i), [str(t) for t in (text_to_image == i).nonzero().ravel().tolist()]) for i in range(60)]
    loader = torch.utils.data.DataLoader(samples, batch_size=16,
                                         collate_fn=lambda b: (torch.stack([x for x, _ in b]), [y for _, y in b]))
    tokenizer = lambda captions: torch.tensor([int(c) for c in captions])  # noqa: E731
    evaluated = zeroshot_retrieval.evaluate(_Embeddings(images, texts), loader, tokenizer, "cpu", amp=False,
                                            recall_k_list=[1, 5, 10])
    assert clip_benchmark_recalls(images, texts, text_to_image.tolist(), batch_size=16) == evaluated
    ours = retrieval_metrics(images, texts, text_to_image)
    for k in (1, 5, 10):
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * evaluated[f"image_retrieval_recall@{k}"])
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * evaluated[f"text_retrieval_recall@{k}"])
    assert 5 < ours["t2i_R@1"] < 95  # the noise leaves something to rank


@pytest.mark.slow
def test_the_case_reports_time_and_memory_side_by_side():
    rows = bench_eval_speed(images=40, captions_per_image=(2, 4), dim=16, classes=6, templates=2, repeats=1)
    assert [r["case"] for r in rows] == ["eval_retrieval", "eval_retrieval", "eval_zeroshot_classifier"]
    assert [r.get("captions") for r in rows] == [80, 160, None]
    for row in rows:
        assert row["ours_s"] > 0 and row["baseline_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["baseline_s"])
        assert row["ours_peak_mib"] >= 0 and row["baseline_peak_mib"] >= 0 and "peak_ratio" in row
    # CLIP_benchmark's means are float32 fractions: equal up to their rounding
    assert rows[0]["max_metric_difference"] < 1e-4 and rows[1]["max_metric_difference"] < 1e-4
    assert "ours_peak_growth" in rows[1] and "baseline_peak_growth" in rows[1]
    assert rows[2]["classes"] == 6 and rows[2]["max_weight_difference"] < 1e-5
