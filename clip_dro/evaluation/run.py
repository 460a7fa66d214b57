"""Evaluating a model on retrieval and zero-shot sets (SPEC 5): ``evaluate`` for the trainer, and
``evaluate_from_cli`` for ``clip-dro eval``. Every set is checked before anything is encoded.

Each result is ``{"task": "retrieval" | "zeroshot_classification", "dataset": NAME, "metrics": {...},
"skipped_images": N, "skipped_examples": [{"image": WHERE, "reason": WHY}, ...]}`` with NAME the set's
directory name; metrics as in :mod:`.retrieval` and :mod:`.zeroshot` (percentages), computed without the N
images that could not be decoded (``on_bad_image="skip"``, the default; the first ``SKIPPED_LISTED`` are
named). With ``on_bad_image="error"`` such an image ends the evaluation with a one-line error naming it.
Embeddings holding NaN or infinity end it too (:class:`NonFiniteEmbeddingError`): ranked, they would score
100.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pandas as pd
import torch
from accelerate import PartialState
from tqdm import tqdm

from clip_dro.checkpoint import TEMPERATURES_DIR, TEMPERATURES_FILE
from clip_dro.data.eval_sets import (BadImage, EvalSetError, ImageBatch, ImageRef, RetrievalSetInfo, ZeroShotSet,
                                     check_retrieval_set, image_batches, load_zeroshot_set)
from clip_dro.errors import UserError
from clip_dro.evaluation.processes import EvaluationStopped, Processes
from clip_dro.evaluation.checkpoint import (MODEL_NAME, load_checkpoint_config, load_checkpoint_model,
                                            resolve_checkpoint)
from clip_dro.evaluation.retrieval import retrieval_metrics
from clip_dro.evaluation.temperatures import analyze_temperatures
from clip_dro.evaluation.zeroshot import CLASSES_PER_BATCH, classification_metrics, zero_shot_classifier
from clip_dro.manifest import is_url

RESULTS_NAME = "eval.json"
ANALYSIS_DIR = "temperature_analysis"
ON_BAD_IMAGE = ("skip", "error")
SKIPPED_LISTED = 10  # skipped images a result names; its count covers all


class EvalError(UserError):
    """An evaluation request that cannot be carried out; the message names the option."""


class NonFiniteEmbeddingError(EvalError):
    """Embeddings of an evaluation set that hold NaN or infinity; the message names the set, the side and the
    number of rows."""


def check_eval_options(batch_size: int, workers: int, on_bad_image: str) -> None:
    """Refuse options that cannot work, before anything is read or encoded."""
    if batch_size < 1:
        raise EvalError(f"batch size (--batch-size) must be at least 1, got {batch_size}")
    if workers < 0:
        raise EvalError(f"workers (--workers) must be at least 0, got {workers}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise EvalError(f"on_bad_image (--on-bad-image) must be one of {', '.join(ON_BAD_IMAGE)}, "
                        f"got {on_bad_image!r}")


def prepare_eval_sets(retrieval_dirs: Sequence[str | Path],
                      zeroshot_dirs: Sequence[str | Path]) -> tuple[list[RetrievalSetInfo], list[ZeroShotSet]]:
    """Check every set (cheap: no image is decoded) so that a bad one fails before any encoding."""
    return [check_retrieval_set(d) for d in retrieval_dirs], [load_zeroshot_set(d) for d in zeroshot_dirs]


def _progress(iterable: Any, total: int, desc: str) -> Any:
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=None, leave=False)


def _require_finite(features: torch.Tensor, side: str, directory: Path) -> None:
    """Refuse embeddings (one per row) holding NaN or infinity: the ranking would put them first."""
    bad = int((~torch.isfinite(features)).any(dim=1).sum())
    if bad:
        raise NonFiniteEmbeddingError(f"eval set {directory}: {bad} of {len(features)} {side} embeddings are not "
                                      "finite (NaN or inf); the model produces non-finite outputs")


def _decoded_batches(images: Sequence[ImageRef], preprocess: Callable, batch_size: int, workers: int,
                     on_bad_image: str, skipped: list[BadImage], desc: str,
                     should_stop: Callable[[], bool]) -> Iterator[ImageBatch]:
    """The batches of :func:`image_batches` that hold images. An image that cannot be decoded is added to
    ``skipped`` or, with ``on_bad_image="error"``, ends the evaluation with a one-line error naming it.
    ``should_stop`` is asked between batches."""
    loader = image_batches(images, preprocess, batch_size, workers)
    for batch in _progress(loader, len(loader), desc):
        if should_stop():
            raise EvaluationStopped()
        if batch.bad and on_bad_image == "error":
            bad = batch.bad[0]
            raise EvalSetError(f"{bad.where}: cannot decode the image ({bad.reason}); on_bad_image='skip' "
                               "(clip-dro eval --on-bad-image skip) leaves such images out and counts them")
        skipped.extend(batch.bad)
        if batch.images is not None:
            yield batch


def _require_decodable(skipped: list[BadImage], total: int, directory: Path) -> None:
    if total and len(skipped) == total:
        raise EvalSetError(f"eval set {directory}: none of its {total} images can be decoded, e.g. "
                           f"{skipped[0].where}: {skipped[0].reason}")


def _gather_skipped(processes: Processes, skipped: list[BadImage]) -> list[BadImage]:
    return [bad for part in processes.gather_objects(skipped) for bad in part]


def _stack(features: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Rows of a process's slice; an empty slice (more processes than images) gives none (``Processes.gather``
    gives them the others' width)."""
    return torch.cat(features) if features else torch.empty(0, device=device)


def encode_retrieval_set(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, info: RetrievalSetInfo,
                         batch_size: int, device: torch.device | str, workers: int = 0,
                         on_bad_image: str = "skip", processes: Processes = Processes(),
                         should_stop: Callable[[], bool] = lambda: False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[BadImage]]:
    """Normalized image features [N, d] (one row per decoded image), caption features [M, d], each caption's
    image row [M], and the images that could not be decoded. Call under ``torch.no_grad`` with the model in
    eval mode. With several ``processes`` each encodes its slice of the images (and their captions) and every
    process gets the whole, in set order.

    An image that cannot be decoded leaves the set together with its captions, so that the set is scored as
    if that sample were not in it: no text->image query asks for an image that is not there, and no caption
    without its image competes in the image->text rankings."""
    part = processes.part(len(info.images), batch_size)

    def encode_slice() -> tuple[torch.Tensor, torch.Tensor, list[int], list[BadImage]]:
        image_features, text_features, text_to_image, skipped = [], [], [], []
        for batch in _decoded_batches(info.images[part], preprocess, batch_size, workers, on_bad_image, skipped,
                                      f"retrieval {info.name}", should_stop):
            first_row = sum(len(f) for f in image_features)
            image_features.append(model.encode_image(batch.images.to(device), normalize=True).float())
            captions = [info.captions[part.start + row] for row in batch.rows]
            flat = [caption for per_image in captions for caption in per_image]
            text_features.append(model.encode_text(tokenizer(flat).to(device), normalize=True).float())
            text_to_image += [first_row + row for row, per_image in enumerate(captions) for _ in per_image]
        return _stack(image_features, device), _stack(text_features, device), text_to_image, skipped

    local_images, local_texts, local_rows, local_skipped = processes.run_agreed(encode_slice)
    skipped = _gather_skipped(processes, local_skipped)
    _require_decodable(skipped, len(info.images), info.directory)
    images, image_counts = processes.gather(local_images)
    texts, _ = processes.gather(local_texts)
    # A caption's image row in the whole set: its row in the slice plus the images of the slices before.
    first_row = sum(image_counts[:processes.rank])
    text_to_image, _ = processes.gather(torch.tensor(local_rows, dtype=torch.long, device=device) + first_row)
    _require_finite(images, "image", info.directory)
    _require_finite(texts, "text", info.directory)
    return images, texts, text_to_image, skipped


def classify_zeroshot_set(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, zs: ZeroShotSet,
                          batch_size: int, device: torch.device | str, workers: int = 0,
                          on_bad_image: str = "skip", processes: Processes = Processes(),
                          should_stop: Callable[[], bool] = lambda: False
                          ) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Logits [N, C] (cosine similarity to each class embedding) and labels [N] of the decoded images of a
    zero-shot set, and the images that could not be decoded. With several ``processes`` each embeds its slice
    of the classes and classifies its slice of the images; every process gets the whole, in set order."""
    classes = processes.part(len(zs.classnames), CLASSES_PER_BATCH)

    def embed_classes() -> torch.Tensor:
        if should_stop():
            raise EvaluationStopped()
        if classes.start == classes.stop:
            return torch.empty(0, device=device)
        return zero_shot_classifier(model, tokenizer, zs.classnames[classes], zs.templates, device).T

    classifier, _ = processes.gather(processes.run_agreed(embed_classes))
    _require_finite(classifier, "class", zs.directory)
    part = processes.part(len(zs.images), batch_size)

    def encode_slice() -> tuple[torch.Tensor, list[int], list[BadImage]]:
        features, labels, skipped = [], [], []
        for batch in _decoded_batches(zs.images[part], preprocess, batch_size, workers, on_bad_image, skipped,
                                      f"zero-shot {zs.name}", should_stop):
            features.append(model.encode_image(batch.images.to(device), normalize=True).float())
            labels += [zs.labels[part.start + row] for row in batch.rows]
        return _stack(features, device), labels, skipped

    local_images, local_labels, local_skipped = processes.run_agreed(encode_slice)
    skipped = _gather_skipped(processes, local_skipped)
    _require_decodable(skipped, len(zs.images), zs.directory)
    images, _ = processes.gather(local_images)
    labels, _ = processes.gather(torch.tensor(local_labels, dtype=torch.long, device=device))
    _require_finite(images, "image", zs.directory)
    return images @ classifier.T, labels.cpu(), skipped


def _result(task: str, name: str, metrics: dict[str, float], skipped: list[BadImage]) -> dict[str, Any]:
    return {"task": task, "dataset": name, "metrics": metrics, "skipped_images": len(skipped),
            "skipped_examples": [{"image": bad.where, "reason": bad.reason} for bad in skipped[:SKIPPED_LISTED]]}


def evaluate_sets(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
                  retrieval_sets: Sequence[RetrievalSetInfo], zeroshot_sets: Sequence[ZeroShotSet],
                  batch_size: int, device: torch.device | str, *, workers: int = 0,
                  on_bad_image: str = "skip", processes: Processes = Processes(),
                  should_stop: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """Results for already checked sets, images decoded in ``workers`` DataLoader workers (0: in this
    process) and undecodable ones skipped and counted, or an error (``on_bad_image``: "skip" or "error"). The
    model is in eval mode meanwhile and its mode is restored.

    With several ``processes`` (a collective: each must call it with the same sets) every process encodes a
    slice of each set and returns the results one process would. ``should_stop`` is asked between batches;
    once it answers True on any process, all raise ``EvaluationStopped`` together."""
    check_eval_options(batch_size, workers, on_bad_image)
    if not hasattr(model, "encode_image"):  # a DistributedDataParallel wrapper
        model = model.module
    was_training = model.training
    model.eval()
    shared = dict(workers=workers, on_bad_image=on_bad_image, processes=processes, should_stop=should_stop)
    results = []
    try:
        with torch.no_grad():
            for info in retrieval_sets:
                images, texts, text_to_image, skipped = encode_retrieval_set(
                    model, tokenizer, preprocess, info, batch_size, device, **shared)
                results.append(_result("retrieval", info.name, retrieval_metrics(images, texts, text_to_image),
                                       skipped))
            for zs in zeroshot_sets:
                logits, labels, skipped = classify_zeroshot_set(model, tokenizer, preprocess, zs, batch_size, device,
                                                                **shared)
                results.append(_result("zeroshot_classification", zs.name, classification_metrics(logits, labels),
                                       skipped))
    finally:
        model.train(was_training)
    return results


def evaluate(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
             retrieval_dirs: Sequence[str | Path], zeroshot_dirs: Sequence[str | Path], batch_size: int,
             device: torch.device | str, *, workers: int = 0, on_bad_image: str = "skip") -> list[dict[str, Any]]:
    """Retrieval and zero-shot results of ``model`` (open_clip-style ``encode_image``/``encode_text``) on the
    given set directories, in that order. Checks the options and every set first; leaves the model's
    train/eval mode as found. ``workers`` and ``on_bad_image`` as in :func:`evaluate_sets`."""
    check_eval_options(batch_size, workers, on_bad_image)
    retrieval_sets, zeroshot_sets = prepare_eval_sets(retrieval_dirs, zeroshot_dirs)
    return evaluate_sets(model, tokenizer, preprocess, retrieval_sets, zeroshot_sets, batch_size, device,
                         workers=workers, on_bad_image=on_bad_image)


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """One table per task: a row per dataset, a column per metric and one for the skipped images; then a line
    per skipped image a result names."""
    frame = pd.DataFrame([{"task": r["task"], "dataset": r["dataset"], **r["metrics"],
                           "skipped_images": r["skipped_images"]} for r in results])
    tables = []
    for task, rows in frame.groupby("task", sort=False):
        rows = rows.drop(columns="task").dropna(axis=1, how="all")
        tables.append(f"{task}:\n" + rows.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
    notes = []
    for r in results:
        named = r["skipped_examples"]
        notes += [f"{r['dataset']}: skipped {e['image']}: {e['reason']}" for e in named]
        if r["skipped_images"] > len(named):
            notes.append(f"{r['dataset']}: ... and {r['skipped_images'] - len(named)} more skipped images")
    return "\n\n".join(tables + (["\n".join(notes)] if notes else []))


def _run_temperature_analysis(ckpt_dir: Path, train_dir: Optional[str]) -> None:
    """The temperature analysis of a run with per-sample temperatures, with concepts when the training set
    is at hand and records them."""
    if not ((ckpt_dir / TEMPERATURES_DIR).is_dir() or (ckpt_dir / TEMPERATURES_FILE).is_file()):
        return
    if train_dir is not None and is_url(train_dir):
        # Concepts would mean streaming every training shard once: not worth it at web scale.
        print(f"temperature analysis: training set {train_dir} is remote; analysing the distribution only")
        train_dir = None
    elif train_dir is not None and not Path(train_dir).is_dir():
        print(f"temperature analysis: training set {train_dir} not found; analysing the distribution only")
        train_dir = None
    summary = analyze_temperatures(ckpt_dir, train_dir, ckpt_dir / ANALYSIS_DIR)
    correlation = summary["concept_frequency"]
    detail = "" if correlation is None else ", Spearman(τ, concept frequency): " + ", ".join(
        f"{side} {c['spearman']:.3f}" if c["spearman"] is not None else f"{side} n/a" for side, c in correlation.items())
    print(f"temperature analysis: {ckpt_dir / ANALYSIS_DIR}{detail}")


def _export(source: Path, export: Path) -> Path:
    target = export / MODEL_NAME if export.is_dir() else export
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def evaluate_from_cli(checkpoint: str | Path, retrieval: Sequence[str | Path], zeroshot: Sequence[str | Path],
                      output: Optional[str | Path], batch_size: int, export: Optional[str | Path],
                      workers: int = 0, on_bad_image: str = "skip") -> dict[str, Any]:
    """``clip-dro eval``: evaluate a run directory's final (or latest) checkpoint or a checkpoint directory on
    the given sets (when none is given: the config's ``eval.retrieval`` and ``eval.zeroshot``), write
    ``{"checkpoint": ..., "results": [...]}`` to ``output`` (default ``<checkpoint>/eval.json``), print a
    table, analyse the temperatures when the checkpoint has them, and copy the open_clip state dict to
    ``export`` when given. ``workers`` and ``on_bad_image`` as in :func:`evaluate_sets`. Under ``accelerate
    launch`` or ``torchrun`` every process encodes a slice of each set and the main process writes and prints.
    Returns the JSON document."""
    check_eval_options(batch_size, workers, on_bad_image)
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = load_checkpoint_config(ckpt_dir)
    retrieval, zeroshot = list(retrieval), list(zeroshot)
    if not retrieval and not zeroshot:
        retrieval, zeroshot = list(cfg.eval.retrieval), list(cfg.eval.zeroshot)
    if not retrieval and not zeroshot and export is None:
        raise EvalError(f"nothing to evaluate: pass --retrieval/--zeroshot, or set eval.retrieval/eval.zeroshot "
                        f"in {ckpt_dir / 'config.yaml'}")
    retrieval_sets, zeroshot_sets = prepare_eval_sets(retrieval, zeroshot)
    processes, device = _launched_processes(cfg.train.collective_timeout_s)
    main = processes.rank == 0

    bundle, _ = load_checkpoint_model(ckpt_dir)
    document: dict[str, Any] = {"checkpoint": str(ckpt_dir), "results": []}
    if retrieval_sets or zeroshot_sets:
        model = bundle.model.to(device)
        document["results"] = evaluate_sets(model, bundle.tokenizer, bundle.preprocess_eval, retrieval_sets,
                                            zeroshot_sets, batch_size, device, workers=workers,
                                            on_bad_image=on_bad_image, processes=processes)
        if main:
            output = Path(output) if output is not None else ckpt_dir / RESULTS_NAME
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(document, indent=2) + "\n")
            print(results_table(document["results"]))
            print(f"results: {output}")
    if main:
        _run_temperature_analysis(ckpt_dir, cfg.data.train)
        if export is not None:
            print(f"exported open_clip state dict: {_export(ckpt_dir / MODEL_NAME, Path(export))}")
    return document


def _launched_processes(collective_timeout_s: int) -> tuple[Processes, torch.device]:
    """Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) every process joins the evaluation, with
    the checkpoint's ``train.collective_timeout_s``; otherwise this one process evaluates alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # cpu=True without CUDA: otherwise the ranks of a CPU launch are not synchronized (ENVIRONMENT.md).
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=collective_timeout_s))
        return Processes.current(), state.device
    return Processes(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
