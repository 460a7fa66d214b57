"""Benchmark (issue 20, design.md §8.5): evaluation speed and peak memory against CLIP_benchmark on the same inputs.

What is compared, and why it is fair
    * Retrieval: images and captions already encoded. Both sides get the same L2-normalized embeddings
      (captions as noisy copies of their image's embedding, so the recalls are far from 0 and 100) and compute
      recall@1/5/10 both ways. Ours: :func:`clip_dro.evaluation.retrieval.retrieval_metrics`. The baseline:
      what CLIP_benchmark's ``zeroshot_retrieval.evaluate`` does once its encoding loop has collected the
      embeddings — the score matrix, the positive-pair matrix, and its own ``batchify(recall_at_k, ...)`` per k
      and direction, with its loader batch size (64, its command-line default) as the chunk
      (:func:`clip_benchmark_recalls`; a test checks that it gives exactly what ``evaluate`` gives). Encoding
      is left out on both sides: it is the model's cost, the same for both.
    * Zero-shot: the classifier build of ``classes`` ImageNet class names x open_clip's 80 OpenAI ImageNet
      templates with the same model (the tiny ViT, random weights, the same seed), tokenizer and prompts:
      ours (:func:`clip_dro.evaluation.zeroshot.zero_shot_classifier`, whole classes up to 128 prompts per
      forward) against CLIP_benchmark's ``zero_shot_classifier`` (one class per forward), fp32 on both sides.

Each side runs in a fresh process (spawn), so that one side's memory cannot flatter the other. Peak memory
is that of the first call: the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over its resident set before the call; on CUDA ``torch.cuda.max_memory_allocated``
over the allocation before. Seconds are the median of the calls after it.

Retrieval runs at two caption counts (5 and 10 per image). CLIP_benchmark's peak grows as images x captions
(the whole score and positive-pair matrices); ours as 512 x captions (one block of query rows of the score
matrix at a time, :mod:`clip_dro.evaluation.retrieval`), whatever the number of images.
"""
from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)
CLIP_BENCHMARK_BATCH = 64  # CLIP_benchmark's --batch_size default: the chunk of its recall_at_k
# caption = its image's embedding + NOISE x Gaussian noise / sqrt(d), normalized: about as similar to its image
# as the most similar of thousands of random images, so that recall@1 is far from 0 and 100
NOISE = 6.0


# ---------------------------------------------------------------------------------------------- the two sides


def retrieval_embeddings(num_images: int, num_captions: int, dim: int, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image [N, d], caption [M, d] embeddings, normalized; caption -> image [M]); each image's captions
    consecutive, as CLIP_benchmark's loader orders them."""
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    text_to_image = torch.arange(num_captions) * num_images // num_captions
    noise = torch.randn(num_captions, dim, generator=gen) * (NOISE / dim ** 0.5)
    texts = F.normalize(images[text_to_image] + noise, dim=1)
    return images, texts, text_to_image


def clip_benchmark_recalls(images_emb: torch.Tensor, texts_emb: torch.Tensor, texts_image_index: list[int],
                           batch_size: int = CLIP_BENCHMARK_BATCH, device: str = "cpu",
                           recall_k_list: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """The part of CLIP_benchmark's ``zeroshot_retrieval.evaluate`` after its encoding loop, line for line, with
    its own ``batchify`` and ``recall_at_k``."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    metrics = {}
    for recall_k in recall_k_list:
        metrics[f"image_retrieval_recall@{recall_k}"] = (batchify(recall_at_k, scores, positive_pairs, batch_size,
                                                                  device, k=recall_k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{recall_k}"] = (batchify(recall_at_k, scores.T, positive_pairs.T, batch_size,
                                                                 device, k=recall_k) > 0).float().mean().item()
    return metrics


def _zeroshot_inputs(num_classes: int, num_templates: int, seed: int) -> tuple[Any, Any, list[str], list]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from clip_dro.models import build_model

    torch.manual_seed(seed)
    bundle = build_model("tiny-vit")
    classnames = [IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)] for i in range(num_classes)]
    return bundle.model.eval(), bundle.tokenizer, classnames, list(OPENAI_IMAGENET_TEMPLATES[:num_templates])


# ---------------------------------------------------------------------------------------------- measuring


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


@contextlib.contextmanager
def _peak(device: torch.device) -> Iterator[dict[str, int]]:
    """Yields a dict that holds, on exit, ``peak_bytes``: the memory the block added at its peak."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    before = _resident_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    yield out
    peak = _resident_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_bytes"] = max(peak - before, 0)


def _measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """The peak of the first call (also the warm-up: in a fresh process nothing it touches was held before,
    so memory that the allocator keeps after a call cannot hide the next call's peak), then the median
    seconds of ``repeats`` more calls, and the output."""
    with _peak(device) as peak:
        output = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": peak["peak_bytes"], "output": output}


def _retrieval_side(side: str, num_images: int, num_captions: int, dim: int, device: str, repeats: int,
                    seed: int) -> dict[str, Any]:
    from clip_dro.evaluation.retrieval import retrieval_metrics

    dev = torch.device(device)
    images, texts, text_to_image = (t.to(dev) for t in retrieval_embeddings(num_images, num_captions, dim, seed))
    if side == "ours":
        def run() -> dict[str, float]:
            return retrieval_metrics(images, texts, text_to_image, ks=RECALL_KS)
    else:
        index = text_to_image.tolist()

        def run() -> dict[str, float]:
            return clip_benchmark_recalls(images, texts, index, device=device)
    return _measure(run, dev, repeats)


def _zeroshot_side(side: str, num_classes: int, num_templates: int, device: str, repeats: int,
                   seed: int) -> dict[str, Any]:
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier as clip_benchmark_classifier

    from clip_dro.evaluation.zeroshot import zero_shot_classifier

    dev = torch.device(device)
    model, tokenizer, classnames, templates = _zeroshot_inputs(num_classes, num_templates, seed)
    model = model.to(dev)
    if side == "ours":
        def run() -> torch.Tensor:
            return zero_shot_classifier(model, tokenizer, classnames, templates, dev).cpu()
    else:
        as_strings = [template("{c}") for template in templates]

        def run() -> torch.Tensor:
            weights = clip_benchmark_classifier(model, tokenizer, classnames, as_strings, dev.type, amp=False)
            return weights.float().cpu()
    return _measure(run, dev, repeats)


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a new spawned process, with progress bars off (CLIP_benchmark's are unconditional)."""
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        # an executor, not a Pool: a child that dies is an error here rather than a worker started again
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
            return executor.submit(fn, *args).result()
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = saved


# ---------------------------------------------------------------------------------------------- the case


def _mib(num_bytes: int) -> float:
    return num_bytes / 2 ** 20


def _row(case: str, ours: dict[str, Any], base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"case": case, **fields, "ours_s": ours["seconds"], "baseline_s": base["seconds"],
            "ratio": ours["seconds"] / base["seconds"], "target": 1.0,
            "ours_peak_mib": _mib(ours["peak_bytes"]), "baseline_peak_mib": _mib(base["peak_bytes"]),
            "peak_ratio": ours["peak_bytes"] / max(base["peak_bytes"], 1)}


def bench_eval_speed(images: int = 5000, captions_per_image: tuple[int, ...] = (5, 10), dim: int = 512,
                     classes: int = 1000, templates: int = 80, repeats: int = 2, device: str = "cpu",
                     seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``eval_retrieval`` (one per caption count) and ``eval_zeroshot_classifier``: median seconds and peak
    memory (MiB) of ours and of CLIP_benchmark, with their ratios (ours / baseline; target: at most 1).
    Retrieval rows also give the largest metric difference (percentage points) and, after the first, how
    each side's peak grew with the captions; the classifier row the largest weight difference. Without the
    ``clip-benchmark`` package, one row that says so."""
    if importlib.util.find_spec("clip_benchmark") is None:
        return [{"case": "eval_speed",
                 "skipped": "the baseline needs CLIP_benchmark: pip install clip-benchmark requests"}]
    rows = []
    for per_image in captions_per_image:
        num_captions = images * per_image
        ours = _in_fresh_process(_retrieval_side, "ours", images, num_captions, dim, device, repeats, seed)
        base = _in_fresh_process(_retrieval_side, "baseline", images, num_captions, dim, device, repeats, seed)
        got, peer = ours["output"], base["output"]
        difference = max(max(abs(got[f"i2t_R@{k}"] - 100 * peer[f"text_retrieval_recall@{k}"]),
                             abs(got[f"t2i_R@{k}"] - 100 * peer[f"image_retrieval_recall@{k}"])) for k in RECALL_KS)
        row = _row("eval_retrieval", ours, base, images=images, captions=num_captions, d=dim, device=device,
                   max_metric_difference=difference, r_mean=got["r_mean"],
                   note="images already encoded: ranking + recall@1/5/10 both ways")
        if rows:
            first = rows[0]
            row["ours_peak_growth"] = row["ours_peak_mib"] / max(first["ours_peak_mib"], 1e-9)
            row["baseline_peak_growth"] = row["baseline_peak_mib"] / max(first["baseline_peak_mib"], 1e-9)
        rows.append(row)
    ours = _in_fresh_process(_zeroshot_side, "ours", classes, templates, device, repeats, seed)
    base = _in_fresh_process(_zeroshot_side, "baseline", classes, templates, device, repeats, seed)
    rows.append(_row("eval_zeroshot_classifier", ours, base, classes=classes, templates=templates, device=device,
                     max_weight_difference=float((ours["output"] - base["output"]).abs().max()),
                     note="class embeddings from classes x templates prompts, tiny-vit text tower"))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for row in bench_eval_speed(images=args.images, classes=args.classes, templates=args.templates,
                                repeats=args.repeats, device=args.device):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
