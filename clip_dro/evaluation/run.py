"""Evaluating a model on retrieval and zero-shot sets (SPEC 5): ``evaluate`` for the trainer, and
``evaluate_from_cli`` for ``clip-dro eval``. Every set is checked before anything is encoded.

Each result is ``{"task": "retrieval" | "zeroshot_classification", "dataset": NAME, "metrics": {...}}`` with
NAME the set's directory name; metrics as in :mod:`.retrieval` and :mod:`.zeroshot` (percentages).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
import torch
from tqdm import tqdm

from clip_dro.checkpoint import TEMPERATURES_FILE
from clip_dro.data.eval_sets import (RetrievalSetInfo, ZeroShotSet, check_retrieval_set, iter_retrieval_batches,
                                     load_zeroshot_set)
from clip_dro.errors import UserError
from clip_dro.evaluation.checkpoint import (MODEL_NAME, load_checkpoint_config, load_checkpoint_model,
                                            resolve_checkpoint)
from clip_dro.evaluation.retrieval import retrieval_metrics
from clip_dro.evaluation.temperatures import analyze_temperatures
from clip_dro.evaluation.zeroshot import classification_metrics, zero_shot_classifier

RESULTS_NAME = "eval.json"
ANALYSIS_DIR = "temperature_analysis"


class EvalError(UserError):
    """An evaluation request that cannot be carried out; the message names the option."""


def prepare_eval_sets(retrieval_dirs: Sequence[str | Path],
                      zeroshot_dirs: Sequence[str | Path]) -> tuple[list[RetrievalSetInfo], list[ZeroShotSet]]:
    """Check every set (cheap: no image is decoded) so that a bad one fails before any encoding."""
    return [check_retrieval_set(d) for d in retrieval_dirs], [load_zeroshot_set(d) for d in zeroshot_dirs]


def _progress(iterable: Any, total: int, desc: str) -> Any:
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=None, leave=False)


def encode_retrieval_set(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, info: RetrievalSetInfo,
                         batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized image features [N, d] (one row per sample), caption features [M, d] and each caption's image
    row [M]. Call under ``torch.no_grad`` with the model in eval mode."""
    image_features, text_features, text_to_image = [], [], []
    batches = iter_retrieval_batches(info.directory, preprocess, batch_size)
    for images, captions, _, _ in _progress(batches, math.ceil(info.num_samples / batch_size), f"retrieval {info.name}"):
        first_row = sum(len(f) for f in image_features)
        image_features.append(model.encode_image(images.to(device), normalize=True).float())
        flat = [caption for per_image in captions for caption in per_image]
        text_features.append(model.encode_text(tokenizer(flat).to(device), normalize=True).float())
        text_to_image += [first_row + row for row, per_image in enumerate(captions) for _ in per_image]
    return (torch.cat(image_features), torch.cat(text_features),
            torch.tensor(text_to_image, dtype=torch.long, device=device))


def classify_zeroshot_set(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, zs: ZeroShotSet,
                          batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (cosine similarity to each class embedding) and labels [N] of a zero-shot set."""
    classifier = zero_shot_classifier(model, tokenizer, zs.classnames, zs.templates, device)
    logits, labels = [], []
    for images, target in _progress(zs.batches(preprocess, batch_size), math.ceil(zs.num_samples / batch_size),
                                    f"zero-shot {zs.name}"):
        logits.append(model.encode_image(images.to(device), normalize=True).float() @ classifier)
        labels.append(target)
    return torch.cat(logits), torch.cat(labels)


def evaluate_sets(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
                  retrieval_sets: Sequence[RetrievalSetInfo], zeroshot_sets: Sequence[ZeroShotSet],
                  batch_size: int, device: torch.device | str) -> list[dict[str, Any]]:
    """Results for already checked sets; the model is in eval mode meanwhile and its mode is restored."""
    if not hasattr(model, "encode_image"):  # a DistributedDataParallel wrapper
        model = model.module
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.no_grad():
            for info in retrieval_sets:
                images, texts, text_to_image = encode_retrieval_set(model, tokenizer, preprocess, info, batch_size, device)
                results.append({"task": "retrieval", "dataset": info.name,
                                "metrics": retrieval_metrics(images, texts, text_to_image)})
            for zs in zeroshot_sets:
                logits, labels = classify_zeroshot_set(model, tokenizer, preprocess, zs, batch_size, device)
                results.append({"task": "zeroshot_classification", "dataset": zs.name,
                                "metrics": classification_metrics(logits, labels)})
    finally:
        model.train(was_training)
    return results


def evaluate(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable,
             retrieval_dirs: Sequence[str | Path], zeroshot_dirs: Sequence[str | Path], batch_size: int,
             device: torch.device | str) -> list[dict[str, Any]]:
    """Retrieval and zero-shot results of ``model`` (open_clip-style ``encode_image``/``encode_text``) on the
    given set directories, in that order. Checks every set first; leaves the model's train/eval mode as found."""
    retrieval_sets, zeroshot_sets = prepare_eval_sets(retrieval_dirs, zeroshot_dirs)
    return evaluate_sets(model, tokenizer, preprocess, retrieval_sets, zeroshot_sets, batch_size, device)


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """One table per task: a row per dataset, a column per metric."""
    frame = pd.DataFrame([{"task": r["task"], "dataset": r["dataset"], **r["metrics"]} for r in results])
    tables = []
    for task, rows in frame.groupby("task", sort=False):
        rows = rows.drop(columns="task").dropna(axis=1, how="all")
        tables.append(f"{task}:\n" + rows.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
    return "\n\n".join(tables)


def _run_temperature_analysis(ckpt_dir: Path, train_dir: Optional[str]) -> None:
    """The temperature analysis of a run with per-sample temperatures, with concepts when the training set
    is at hand and records them."""
    csv = ckpt_dir / TEMPERATURES_FILE
    if not csv.is_file():
        return
    if train_dir is not None and not Path(train_dir).is_dir():
        print(f"temperature analysis: training set {train_dir} not found; analysing the distribution only")
        train_dir = None
    summary = analyze_temperatures(csv, train_dir, ckpt_dir / ANALYSIS_DIR)
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
                      output: Optional[str | Path], batch_size: int, export: Optional[str | Path]) -> dict[str, Any]:
    """``clip-dro eval``: evaluate a run directory's final (or latest) checkpoint or a checkpoint directory on
    the given sets (when none is given: the config's ``eval.retrieval`` and ``eval.zeroshot``), write
    ``{"checkpoint": ..., "results": [...]}`` to ``output`` (default ``<checkpoint>/eval.json``), print a
    table, analyse the temperatures when the checkpoint has ``temperatures.csv``, and copy the open_clip
    state dict to ``export`` when given. Returns the JSON document."""
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = load_checkpoint_config(ckpt_dir)
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    retrieval, zeroshot = list(retrieval), list(zeroshot)
    if not retrieval and not zeroshot:
        retrieval, zeroshot = list(cfg.eval.retrieval), list(cfg.eval.zeroshot)
    if not retrieval and not zeroshot and export is None:
        raise EvalError(f"nothing to evaluate: pass --retrieval/--zeroshot, or set eval.retrieval/eval.zeroshot "
                        f"in {ckpt_dir / 'config.yaml'}")
    retrieval_sets, zeroshot_sets = prepare_eval_sets(retrieval, zeroshot)
    _run_temperature_analysis(ckpt_dir, cfg.data.train)

    bundle, _ = load_checkpoint_model(ckpt_dir)
    document: dict[str, Any] = {"checkpoint": str(ckpt_dir), "results": []}
    if retrieval_sets or zeroshot_sets:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = bundle.model.to(device)
        document["results"] = evaluate_sets(model, bundle.tokenizer, bundle.preprocess_eval, retrieval_sets,
                                            zeroshot_sets, batch_size, device)
        output = Path(output) if output is not None else ckpt_dir / RESULTS_NAME
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(document, indent=2) + "\n")
        print(results_table(document["results"]))
        print(f"results: {output}")
    if export is not None:
        print(f"exported open_clip state dict: {_export(ckpt_dir / MODEL_NAME, Path(export))}")
    return document
