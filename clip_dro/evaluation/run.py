"""Evaluating a model on retrieval and zero-shot sets (design.md §8): ``evaluate`` for the trainer, and
``evaluate_from_cli`` for ``clip-dro eval``. Every set is checked before anything is encoded.

Each result is ``{"task": "retrieval" | "zeroshot_classification", "dataset": NAME, "metrics": {...},
"skipped_images": N, "skipped_examples": [{"image": WHERE, "reason": WHY}, ...]}`` (and ``"tail"``, the tail
analysis, when ``clip-dro eval`` is given the training set) with NAME the set's name; metrics as in
:mod:`.retrieval` and :mod:`.zeroshot` (percentages), computed without the N images that could not be decoded
(``on_bad_image="skip"``, the default; the first ``SKIPPED_LISTED`` are named). With ``on_bad_image="error"`` such an image ends the evaluation with a one-line error naming it.
Embeddings holding NaN or infinity end it too (:class:`NonFiniteEmbeddingError`): ranked, they would score
100.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from clip_dro.checkpoint import TEMPERATURES_DIR, TEMPERATURES_FILE
from clip_dro.config import Config
from clip_dro.data.benchmark_sets import open_retrieval_set, open_zeroshot_set
from clip_dro.data.eval_sets import (BadImage, EvalSetError, ImageBatch, ImageRef, RetrievalSetInfo, ZeroShotSet,
                                     image_batches)
from clip_dro.errors import UserError
from clip_dro.evaluation import tail
from clip_dro.evaluation.any_model import load_any_model
from clip_dro.evaluation.benchmark_format import collect_results, file_slug, write_benchmark_results
from clip_dro.checkpoint import MODEL_FILE as MODEL_NAME
from clip_dro.checkpoint import load_checkpoint_config, load_checkpoint_model, resolve_checkpoint
from clip_dro.distributed import EvaluationStopped, Processes, launched_processes
from clip_dro.evaluation.retrieval import recall_metrics, retrieval_ranks
from clip_dro.evaluation.temperatures import analyze_temperatures
from clip_dro.evaluation.zeroshot import (classes_per_forward, classification_metrics, top1_predictions,
                                          zero_shot_classifier)
from clip_dro.manifest import is_url, load_manifest
from clip_dro.models import ModelBundle

RESULTS_NAME = "eval.json"
ANALYSIS_DIR = "temperature_analysis"
BENCHMARK_DIR = "clip_benchmark"  # CLIP_benchmark-shaped results, beside the results JSON
TAIL_DIR = "tail"  # tail analysis plots, beside the results JSON
COMPARISON_DIR = "comparison"  # the default output of an evaluation of several models
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


@dataclass(frozen=True)
class EvalOptions:
    """What the evaluation of every set shares: the model with its tokenizer and eval transform, and how to
    run it (images decoded ``batch_size`` at a time in ``workers`` DataLoader workers, undecodable ones
    skipped or an error per ``on_bad_image``, each of ``processes`` encoding a slice, ``should_stop`` asked
    between batches). Checked when made."""

    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable
    batch_size: int
    device: torch.device | str
    workers: int = 0
    on_bad_image: str = "skip"
    processes: Processes = Processes()
    should_stop: Callable[[], bool] = lambda: False

    def __post_init__(self) -> None:
        check_eval_options(self.batch_size, self.workers, self.on_bad_image)


def _image_roots(retrieval: Sequence[str | Path], image_root: Sequence[str | Path]) -> dict[int, Optional[Path]]:
    """The image root of each Karpathy JSON set (by position in ``retrieval``): one root for all, one per JSON
    set in order, or none (each JSON's own directory)."""
    positions = [i for i, s in enumerate(retrieval) if not is_url(s) and str(s).lower().endswith(".json")]
    roots = [Path(r) for r in image_root]
    if roots and not positions:
        raise EvalError("--image-root is for Karpathy JSON retrieval sets (--retrieval FILE.json); none is given")
    if len(roots) not in (0, 1, len(positions)):
        raise EvalError(f"--image-root: {len(roots)} directories for {len(positions)} Karpathy JSON sets; give one "
                        "for all of them or one per JSON set, in order")
    return {i: roots[0] if len(roots) == 1 else roots[n] if roots else None for n, i in enumerate(positions)}


def prepare_eval_sets(retrieval_dirs: Sequence[str | Path], zeroshot_dirs: Sequence[str | Path], *,
                      image_root: Sequence[str | Path] = (), split: str = "test"
                      ) -> tuple[list[RetrievalSetInfo], list[ZeroShotSet]]:
    """Check every set (cheap: no image is decoded) so that a bad one fails before any encoding. Sets are in
    any layout :mod:`clip_dro.data.benchmark_sets` reads; ``image_root`` and ``split`` as there."""
    roots = _image_roots(retrieval_dirs, image_root)
    return ([open_retrieval_set(d, roots.get(i), split) for i, d in enumerate(retrieval_dirs)],
            [open_zeroshot_set(d, split) for d in zeroshot_dirs])


def _progress(iterable: Any, total: int, desc: str) -> Any:
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=None, leave=False)


def _require_finite(features: torch.Tensor, side: str, directory: Path) -> None:
    """Refuse embeddings (one per row) holding NaN or infinity: the ranking would put them first."""
    bad = int((~torch.isfinite(features)).any(dim=1).sum())
    if bad:
        raise NonFiniteEmbeddingError(f"eval set {directory}: {bad} of {len(features)} {side} embeddings are not "
                                      "finite (NaN or inf); the model produces non-finite outputs")


def _decoded_batches(images: Sequence[ImageRef], options: EvalOptions, skipped: list[BadImage],
                     desc: str) -> Iterator[ImageBatch]:
    """The batches of :func:`image_batches` that hold images. An image that cannot be decoded is added to
    ``skipped`` or, with ``on_bad_image="error"``, ends the evaluation with a one-line error naming it.
    ``should_stop`` is asked between batches."""
    loader = image_batches(images, options.preprocess, options.batch_size, options.workers)
    for batch in _progress(loader, len(loader), desc):
        if options.should_stop():
            raise EvaluationStopped()
        if batch.bad and options.on_bad_image == "error":
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


@dataclass
class EncodedRetrievalSet:
    """A retrieval set's normalized image features [N, d] (one row per decoded image), caption features
    [M, d], each caption's image row [M], the set positions of the decoded images [N], and the images that
    could not be decoded."""

    images: torch.Tensor
    texts: torch.Tensor
    text_to_image: torch.Tensor
    kept: list[int]
    skipped: list[BadImage]


def encode_retrieval_set(info: RetrievalSetInfo, options: EvalOptions) -> EncodedRetrievalSet:
    """Encode a retrieval set. Call under ``torch.no_grad`` with the model in eval mode. With several
    ``processes`` each encodes its slice of the images (and their captions) and every process gets the
    whole, in set order.

    An image that cannot be decoded leaves the set together with its captions, so that the set is scored as
    if that sample were not in it: no text->image query asks for an image that is not there, and no caption
    without its image competes in the image->text rankings."""
    model, processes, device = options.model, options.processes, options.device
    part = processes.part(len(info.images), options.batch_size)

    def encode_slice() -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], list[BadImage]]:
        image_features, text_features, text_to_image, kept, skipped = [], [], [], [], []
        for batch in _decoded_batches(info.images[part], options, skipped, f"retrieval {info.name}"):
            first_row = sum(len(f) for f in image_features)
            image_features.append(model.encode_image(batch.images.to(device), normalize=True).float())
            captions = [info.captions[part.start + row] for row in batch.rows]
            flat = [caption for per_image in captions for caption in per_image]
            text_features.append(model.encode_text(options.tokenizer(flat).to(device), normalize=True).float())
            text_to_image += [first_row + row for row, per_image in enumerate(captions) for _ in per_image]
            kept += [part.start + row for row in batch.rows]
        return _stack(image_features, device), _stack(text_features, device), text_to_image, kept, skipped

    local_images, local_texts, local_rows, local_kept, local_skipped = processes.run_agreed(encode_slice)
    skipped = _gather_skipped(processes, local_skipped)
    _require_decodable(skipped, len(info.images), info.directory)
    images, image_counts = processes.gather(local_images)
    texts, _ = processes.gather(local_texts)
    # A caption's image row in the whole set: its row in the slice plus the images of the slices before.
    first_row = sum(image_counts[:processes.rank])
    text_to_image, _ = processes.gather(torch.tensor(local_rows, dtype=torch.long, device=device) + first_row)
    kept = [position for part_kept in processes.gather_objects(local_kept) for position in part_kept]
    _require_finite(images, "image", info.directory)
    _require_finite(texts, "text", info.directory)
    return EncodedRetrievalSet(images, texts, text_to_image, kept, skipped)


def classify_zeroshot_set(zs: ZeroShotSet, options: EvalOptions) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Logits [N, C] (cosine similarity to each class embedding) and labels [N] of the decoded images of a
    zero-shot set, and the images that could not be decoded. With several ``processes`` each embeds its slice
    of the classes and classifies its slice of the images; every process gets the whole, in set order."""
    model, processes, device = options.model, options.processes, options.device
    classes = processes.part(len(zs.classnames), classes_per_forward(len(zs.templates)))

    def embed_classes() -> torch.Tensor:
        if options.should_stop():
            raise EvaluationStopped()
        if classes.start == classes.stop:
            return torch.empty(0, device=device)
        return zero_shot_classifier(model, options.tokenizer, zs.classnames[classes], zs.templates, device).T

    classifier, _ = processes.gather(processes.run_agreed(embed_classes))
    _require_finite(classifier, "class", zs.directory)
    part = processes.part(len(zs.images), options.batch_size)

    def encode_slice() -> tuple[torch.Tensor, list[int], list[BadImage]]:
        features, labels, skipped = [], [], []
        for batch in _decoded_batches(zs.images[part], options, skipped, f"zero-shot {zs.name}"):
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


@dataclass
class SetOutcome:
    """A set's result with the per-query outcomes behind it, for the tail analysis: per image of a zero-shot
    set its label and top-1 class; per caption of a retrieval set its text (text order) and t2i hit at 1."""

    result: dict[str, Any]
    eval_set: RetrievalSetInfo | ZeroShotSet
    labels: Optional[np.ndarray] = None
    predictions: Optional[np.ndarray] = None
    captions: Optional[list[str]] = None
    caption_hit_at1: Optional[np.ndarray] = None


def _retrieval_outcome(info: RetrievalSetInfo, options: EvalOptions) -> SetOutcome:
    encoded = encode_retrieval_set(info, options)
    i2t, t2i = retrieval_ranks(encoded.images, encoded.texts, encoded.text_to_image)
    result = _result("retrieval", info.name, recall_metrics(i2t, t2i), encoded.skipped)
    captions = [caption for position in encoded.kept for caption in info.captions[position]]
    return SetOutcome(result, info, captions=captions, caption_hit_at1=(t2i < 1).cpu().numpy())


def _zeroshot_outcome(zs: ZeroShotSet, options: EvalOptions) -> SetOutcome:
    logits, labels, skipped = classify_zeroshot_set(zs, options)
    result = _result("zeroshot_classification", zs.name, classification_metrics(logits, labels), skipped)
    return SetOutcome(result, zs, labels=labels.numpy(), predictions=top1_predictions(logits).cpu().numpy())


def evaluate_outcomes(options: EvalOptions, retrieval_sets: Sequence[RetrievalSetInfo],
                      zeroshot_sets: Sequence[ZeroShotSet]) -> list[SetOutcome]:
    """The outcome of every already checked set, retrieval sets first. The model is in eval mode meanwhile
    and its mode is restored. With several ``options.processes`` (a collective: each must call it with the
    same sets) every process encodes a slice of each set and gets the outcomes one process would; once
    ``should_stop`` answers True on any process, all raise ``EvaluationStopped`` together."""
    model = options.model
    if not hasattr(model, "encode_image"):  # a DistributedDataParallel wrapper
        options = replace(options, model=model.module)
    was_training = options.model.training
    options.model.eval()
    try:
        with torch.no_grad():
            return ([_retrieval_outcome(info, options) for info in retrieval_sets]
                    + [_zeroshot_outcome(zs, options) for zs in zeroshot_sets])
    finally:
        options.model.train(was_training)


def evaluate_sets(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
                  retrieval_sets: Sequence[RetrievalSetInfo], zeroshot_sets: Sequence[ZeroShotSet],
                  batch_size: int, device: torch.device | str, *, workers: int = 0,
                  on_bad_image: str = "skip", processes: Processes = Processes(),
                  should_stop: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """The results of :func:`evaluate_outcomes` for :class:`EvalOptions` made of these arguments."""
    options = EvalOptions(model, tokenizer, preprocess, batch_size, device, workers, on_bad_image, processes,
                          should_stop)
    return [outcome.result for outcome in evaluate_outcomes(options, retrieval_sets, zeroshot_sets)]


def evaluate(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
             retrieval_dirs: Sequence[str | Path], zeroshot_dirs: Sequence[str | Path], batch_size: int,
             device: torch.device | str, *, workers: int = 0, on_bad_image: str = "skip") -> list[dict[str, Any]]:
    """Retrieval and zero-shot results of ``model`` (open_clip-style ``encode_image``/``encode_text``) on the
    given sets, in that order. Checks the options and every set first; leaves the model's train/eval mode
    as found. ``workers`` and ``on_bad_image`` as in :class:`EvalOptions`."""
    options = EvalOptions(model, tokenizer, preprocess, batch_size, device, workers, on_bad_image)
    retrieval_sets, zeroshot_sets = prepare_eval_sets(retrieval_dirs, zeroshot_dirs)
    return [outcome.result for outcome in evaluate_outcomes(options, retrieval_sets, zeroshot_sets)]


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


def _run_temperature_analysis(ckpt_dir: Path, train_dirs: Optional[list[str]]) -> None:
    """The temperature analysis of a run with per-sample temperatures, with concepts when the training sets
    are at hand and record them."""
    if not ((ckpt_dir / TEMPERATURES_DIR).is_dir() or (ckpt_dir / TEMPERATURES_FILE).is_file()):
        return
    remote = [d for d in train_dirs or () if is_url(d)]
    missing = [d for d in train_dirs or () if not is_url(d) and not Path(d).is_dir()]
    if remote:
        # Concepts would mean streaming every training shard once: not worth it at web scale.
        print(f"temperature analysis: training set {remote[0]} is remote; analysing the distribution only")
        train_dirs = None
    elif missing:
        print(f"temperature analysis: training set {missing[0]} not found; analysing the distribution only")
        train_dirs = None
    summary = analyze_temperatures(ckpt_dir, train_dirs, ckpt_dir / ANALYSIS_DIR)
    correlation = summary["concept_frequency"]
    detail = "" if correlation is None else ", Spearman(τ, concept frequency): " + ", ".join(
        f"{side} {c['spearman']:.3f}" if c["spearman"] is not None else f"{side} n/a" for side, c in correlation.items())
    print(f"temperature analysis: {ckpt_dir / ANALYSIS_DIR}{detail}")


def _export(source: Path, export: Path) -> Path:
    target = export / MODEL_NAME if export.is_dir() else export
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


PathLike = str | Path


def _listed(value: Any) -> list:
    """One value or a sequence of them (``None``: none) as a list; a string is one value."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, Path)) else list(value)


@dataclass(frozen=True)
class ModelUnderTest:
    """What ``clip-dro eval`` evaluates: a checkpoint of ours (``checkpoint``, its directory; ``named``, the
    directory as the user named it) or an architecture ``model`` with the weights file ``pretrained`` (and
    ``text_tower``)."""

    model: str
    pretrained: Optional[str]
    checkpoint: Optional[Path] = None
    text_tower: Optional[str] = None
    config: Optional[Config] = None
    named: Optional[str] = None

    @classmethod
    def of_checkpoint(cls, checkpoint: PathLike) -> "ModelUnderTest":
        ckpt_dir = resolve_checkpoint(checkpoint)
        cfg = load_checkpoint_config(ckpt_dir)
        return cls(cfg.model.name, str(ckpt_dir / MODEL_NAME), ckpt_dir, cfg.model.text_tower, cfg, str(checkpoint))

    def load(self) -> ModelBundle:
        if self.checkpoint is not None:
            return load_checkpoint_model(self.checkpoint)[0]
        return load_any_model(self.model, self.pretrained, self.text_tower)


def models_under_test(checkpoints: Any = None, models: Any = None, pretrained: Any = None,
                      text_towers: Any = None) -> list["ModelUnderTest"]:
    """The models ``clip-dro eval`` is asked for, checkpoints first, then architectures, in the order given:
    ``checkpoints`` (run or checkpoint directories), ``models`` (architecture names) with ``pretrained`` and
    ``text_towers`` none or one per model, in order. Each argument is one value or a sequence of them."""
    checkpoints, models = _listed(checkpoints), _listed(models)
    pretrained, text_towers = _listed(pretrained), _listed(text_towers)
    if not checkpoints and not models:
        raise EvalError("name what to evaluate: --checkpoint DIR (a run of ours) or --model NAME "
                        "[--pretrained FILE], one or more of them")
    if (pretrained or text_towers) and not models:
        raise EvalError("--pretrained and --text-tower go with --model; a --checkpoint brings its own weights")
    for option, values in (("--pretrained", pretrained), ("--text-tower", text_towers)):
        if values and len(values) != len(models):
            raise EvalError(f"{option}: {len(values)} given for {len(models)} --model; give one per --model, in "
                            "order (or none)")
    return ([ModelUnderTest.of_checkpoint(c) for c in checkpoints]
            + [ModelUnderTest(name, None if not pretrained else str(pretrained[i]),
                              text_tower=None if not text_towers else text_towers[i], named=name)
               for i, name in enumerate(models)])


def model_labels(sources: Sequence[ModelUnderTest]) -> list[str]:
    """A short distinct name per model, for the comparison table: a checkpoint's directory name (``runs/clip``:
    ``clip``), an architecture's name; where two coincide, the checkpoint directory as named or the name with
    the weights file (``ViT-B-32 b32_laion.pt``), then a number."""
    def short(s: ModelUnderTest) -> str:
        return Path(s.named).resolve().name if s.checkpoint is not None else s.model

    def longer(s: ModelUnderTest) -> str:
        if s.checkpoint is not None:
            return s.named
        return f"{s.model} {Path(s.pretrained).name if s.pretrained else 'random'}"

    labels = [short(s) for s in sources]
    labels = [longer(s) if labels.count(label) > 1 else label for s, label in zip(sources, labels)]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _check_train_data(train_data: Optional[str | Path]) -> None:
    """The training set of the tail analysis must be a prep directory (or its URL): checked before encoding."""
    if train_data is not None:
        try:
            load_manifest(train_data)
        except UserError as exc:
            raise EvalError(f"--train-data {train_data}: {exc}") from None


def _tail_report(outcome: SetOutcome, train_data: str | Path, plot_dir: Path) -> dict[str, Any]:
    """The tail analysis of one set against the training captions (see :mod:`clip_dro.evaluation.tail`)."""
    if outcome.labels is not None:
        zs = outcome.eval_set
        report = tail.zeroshot_tail(outcome.labels, outcome.predictions, tail.class_frequencies(
            train_data, zs.classnames), zs.classnames)
        report["plot"] = str(tail.plot_zeroshot_tail(report, plot_dir / f"{zs.name}_tail.png"))
        return report
    return tail.retrieval_tail(outcome.captions, outcome.caption_hit_at1, tail.caption_word_frequencies(train_data))


def evaluate_from_cli(checkpoint: Any = None, retrieval: Sequence[PathLike] = (), zeroshot: Sequence[PathLike] = (),
                      output: Optional[PathLike] = None, batch_size: int = 256, export: Optional[PathLike] = None,
                      workers: int = 0, on_bad_image: str = "skip", *, model: Any = None, pretrained: Any = None,
                      text_tower: Any = None, image_root: Sequence[PathLike] = (), split: str = "test",
                      benchmark_dir: Optional[PathLike] = None, train_data: Optional[PathLike] = None
                      ) -> dict[str, Any]:
    """``clip-dro eval``: evaluate one model or several (:func:`models_under_test`: run or checkpoint directories,
    a run directory's final or latest checkpoint; architectures ``model`` with the weights files ``pretrained``)
    on the given sets (a checkpoint without sets: its config's ``eval.retrieval`` and ``eval.zeroshot``;
    ``image_root`` and ``split`` as in :func:`prepare_eval_sets`).

    One model: writes ``{"checkpoint", "model", "pretrained", "results": [...]}`` to ``output`` (default
    ``<checkpoint>/eval.json``, or ``eval.json`` here for ``model``), one CLIP_benchmark JSON per result and the
    CSV of all of them in ``benchmark_dir`` (default ``clip_benchmark/`` beside ``output``), prints a table, with
    ``train_data`` adds each result's ``tail`` analysis (plots in ``tail/`` beside ``output``), analyses the
    temperatures when the checkpoint has them, copies the checkpoint's open_clip state dict to ``export`` when
    given, and returns the document.

    Several models: ``output`` is a directory (default ``comparison/``) that gets each model's document as
    ``<label>.json`` (:func:`model_labels`), their CLIP_benchmark JSONs in one ``benchmark_dir`` (default
    ``clip_benchmark/`` there), tail plots in ``tail/<label>/`` and the comparison of them all
    (:func:`clip_dro.evaluation.tail.compare_models`: ``comparison.csv``, ``.md``, ``.png``); returns
    ``{"models": {label: document}, "comparison": [csv, md, png]}``.

    ``workers`` and ``on_bad_image`` as in :class:`EvalOptions`. Under ``accelerate launch`` or ``torchrun``
    every process encodes a slice of each set and the main process writes and prints."""
    check_eval_options(batch_size, workers, on_bad_image)
    sources = models_under_test(checkpoint, model, pretrained, text_tower)
    several = len(sources) > 1
    if export is not None and (several or sources[0].checkpoint is None):
        raise EvalError("--export copies the open_clip state dict of one --checkpoint; with --model the weights "
                        "file already is one")
    if several and output is not None and Path(output).suffix.lower() == ".json":
        raise EvalError(f"--output {output}: with several models it names a directory (each model's JSON and the "
                        "comparison table go there), not a JSON file")
    sets = _sets_of(sources, list(retrieval), list(zeroshot), export is not None, image_root, split)
    _check_train_data(train_data)
    timeout = max((source.config or Config()).train.collective_timeout_s for source in sources)
    processes, device = launched_processes(timeout)
    main = processes.rank == 0
    options = dict(batch_size=batch_size, workers=workers, on_bad_image=on_bad_image, processes=processes,
                   device=device, train_data=train_data)

    if not several:
        source = sources[0]
        default = source.checkpoint / RESULTS_NAME if source.checkpoint is not None else Path(RESULTS_NAME)
        output = Path(output) if output is not None else default
        benchmark_dir = Path(benchmark_dir) if benchmark_dir else output.parent / BENCHMARK_DIR
        document = _evaluate_model(source, *sets[0], output=output, tail_dir=output.parent / TAIL_DIR,
                                   benchmark_dir=benchmark_dir, **options)
        if main and export is not None:
            print(f"exported open_clip state dict: {_export(source.checkpoint / MODEL_NAME, Path(export))}")
        return document

    out_dir = Path(output) if output is not None else Path(COMPARISON_DIR)
    benchmark_dir = Path(benchmark_dir) if benchmark_dir else out_dir / BENCHMARK_DIR
    documents = {}
    for label, source, (retrieval_sets, zeroshot_sets) in zip(model_labels(sources), sources, sets):
        if main:
            print(f"== {label} ==")
        documents[label] = _evaluate_model(source, retrieval_sets, zeroshot_sets,
                                           output=out_dir / f"{file_slug(label)}.json", benchmark_dir=benchmark_dir,
                                           tail_dir=out_dir / TAIL_DIR / file_slug(label), **options)
    paths = list(tail.compare_models(documents, out_dir)) if main else []
    if main:
        print(paths[1].read_text(encoding="utf-8"))
        print(f"comparison of {len(documents)} models: {', '.join(map(str, paths))}")
    return {"models": documents, "comparison": [str(p) for p in paths]}


def _sets_of(sources: Sequence[ModelUnderTest], retrieval: list[PathLike], zeroshot: list[PathLike], exporting: bool,
             image_root: Sequence[PathLike], split: str) -> list[tuple[list[RetrievalSetInfo], list[ZeroShotSet]]]:
    """The checked sets of each model: those given, else a checkpoint's config's; each set checked once."""
    checked: dict[tuple, tuple[list[RetrievalSetInfo], list[ZeroShotSet]]] = {}
    out = []
    for source in sources:
        names = (retrieval, zeroshot)
        if source.config is not None and not retrieval and not zeroshot:
            names = (list(source.config.eval.retrieval), list(source.config.eval.zeroshot))
        if not any(names) and not exporting:
            config = (f", or set eval.retrieval/eval.zeroshot in {source.checkpoint / 'config.yaml'}"
                      if source.checkpoint is not None else "")
            raise EvalError(f"nothing to evaluate: pass --retrieval/--zeroshot{config}")
        key = (tuple(map(str, names[0])), tuple(map(str, names[1])))
        if key not in checked:
            checked[key] = prepare_eval_sets(*names, image_root=image_root, split=split)
        out.append(checked[key])
    return out


def _evaluate_model(source: ModelUnderTest, retrieval_sets: list[RetrievalSetInfo], zeroshot_sets: list[ZeroShotSet],
                    *, output: Path, benchmark_dir: Path, tail_dir: Path, batch_size: int, workers: int,
                    on_bad_image: str, processes: Processes, device: torch.device | str,
                    train_data: Optional[PathLike]) -> dict[str, Any]:
    """One model's document (see :func:`evaluate_from_cli`), written by the main process with its CLIP_benchmark
    JSONs and tail plots; then the temperature analysis of a checkpoint that has temperatures."""
    main = processes.rank == 0
    bundle = source.load()
    document: dict[str, Any] = {"checkpoint": None if source.checkpoint is None else str(source.checkpoint),
                                "model": source.model, "pretrained": source.pretrained, "results": []}
    if retrieval_sets or zeroshot_sets:
        options = EvalOptions(bundle.model.to(device), bundle.tokenizer, bundle.preprocess_eval, batch_size, device,
                              workers, on_bad_image, processes)
        outcomes = evaluate_outcomes(options, retrieval_sets, zeroshot_sets)
        document["results"] = [outcome.result for outcome in outcomes]
        if main:
            if train_data is not None:
                for outcome in outcomes:
                    outcome.result["tail"] = _tail_report(outcome, train_data, tail_dir)
            _write_results(document, output, benchmark_dir)
    if main and source.checkpoint is not None:
        _run_temperature_analysis(source.checkpoint, source.config.data.train)
    return document


def _write_results(document: dict[str, Any], output: Path, benchmark_dir: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    write_benchmark_results(document, benchmark_dir)
    table, passed_over = collect_results(benchmark_dir)
    print(results_table(document["results"]))
    for result in document["results"]:
        if "tail" in result:
            print(tail_line(result))
    print(f"results: {output}")
    print(f"in CLIP_benchmark's shape: {benchmark_dir} (with every such file there collected in {table.name})")
    for path in passed_over:
        print(f"note: {path} is not a CLIP_benchmark result; left out of {table.name}")


def tail_line(result: dict[str, Any]) -> str:
    """One line of a result's tail analysis: the terciles' accuracy and the Spearman correlation."""
    report = result["tail"]
    terciles = ", ".join(f"{name} {report['terciles'][name]['accuracy']:.1f}" if report["terciles"][name]["accuracy"]
                         is not None else f"{name} -" for name in tail.BUCKETS)
    spearman = "n/a" if report.get("spearman") is None else f"{report['spearman']:.3f}"
    return f"tail {result['dataset']} ({report['metric']} by training frequency): {terciles}; Spearman {spearman}"

