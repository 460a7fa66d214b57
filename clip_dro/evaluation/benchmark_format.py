"""Results in CLIP_benchmark's own shape, beside ours, so that analysis scripts written for it read ours unchanged.

Per (dataset, task) one JSON ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` as
``clip_benchmark eval`` dumps it: task ``zeroshot_classification`` with ``acc1``, ``acc5`` (NaN below 5
classes, as CLIP_benchmark writes it) and ``mean_per_class_recall``; task ``zeroshot_retrieval`` with
``image_retrieval_recall@k`` (= our ``t2i_R@k`` / 100) and ``text_retrieval_recall@k`` (= ``i2t_R@k`` / 100).
Fractions, not percentages. :func:`collect_results` then writes one CSV of every such JSON of a directory, as
``clip_benchmark build`` does (a row per file: its fields, its metrics, ``model_fullname`` = model + " " +
pretrained).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd

from clip_dro.evaluation.retrieval import RECALL_KS

TABLE_NAME = "benchmark.csv"
LANGUAGE = "en"
_FIELDS = ("dataset", "model", "pretrained", "task", "metrics")


def benchmark_metrics(task: str, metrics: Mapping[str, float]) -> tuple[str, dict[str, float]]:
    """CLIP_benchmark's task name and metrics for one of our results."""
    if task == "retrieval":
        return "zeroshot_retrieval", {
            **{f"image_retrieval_recall@{k}": metrics[f"t2i_R@{k}"] / 100 for k in RECALL_KS},
            **{f"text_retrieval_recall@{k}": metrics[f"i2t_R@{k}"] / 100 for k in RECALL_KS}}
    return "zeroshot_classification", {"acc1": metrics["acc1"] / 100,
                                       "acc5": metrics["acc5"] / 100 if "acc5" in metrics else math.nan,
                                       "mean_per_class_recall": metrics["mean_per_class_recall"] / 100}


def file_slug(text: str) -> str:
    """``text`` as a plain file name: runs of other characters than letters, digits, ``.``, ``_`` and ``-``
    become one ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "none"


def write_benchmark_results(document: Mapping[str, Any], directory: Path) -> list[Path]:
    """One CLIP_benchmark JSON per result of our ``document`` in ``directory``, named as CLIP_benchmark names
    them (``{dataset}_{pretrained}_{model}_{language}_{task}.json``, the weights file as its last two path
    parts, three for a checkpoint's ``model.pt`` so that runs differ: ``isogclr-final-model.pt``); returns the
    paths."""
    directory.mkdir(parents=True, exist_ok=True)
    pretrained = document.get("pretrained")
    parts = 3 if document.get("checkpoint") else 2  # a checkpoint's model.pt: with the run's directory
    weights = "random" if pretrained is None else "-".join(Path(pretrained).parts[-parts:])
    paths = []
    for result in document["results"]:
        task, metrics = benchmark_metrics(result["task"], result["metrics"])
        record = {"dataset": result["dataset"], "model": document["model"], "pretrained": pretrained or "",
                  "task": task, "metrics": metrics, "language": LANGUAGE}
        path = directory / "_".join(file_slug(part) for part in (result["dataset"], weights, document["model"],
                                                              LANGUAGE, task))
        path = path.with_name(path.name + ".json")
        path.write_text(json.dumps(record) + "\n")
        paths.append(path)
    return paths


def _row(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not all(k in data for k in _FIELDS) or not isinstance(data["metrics"], dict):
        return None
    row = {**data["metrics"], **{k: v for k, v in data.items() if k != "metrics"}}
    row["model_fullname"] = f"{row['model']} {row['pretrained']}"
    return row


def collect_results(directory: Path, output: Optional[Path] = None) -> tuple[Path, list[Path]]:
    """Every CLIP_benchmark result JSON of ``directory`` (ours and CLIP_benchmark's own) as one CSV, default
    ``directory/benchmark.csv``; returns it and the JSON files passed over (not such a result)."""
    rows, passed_over = [], []
    for path in sorted(directory.glob("*.json")):
        row = _row(path)
        if row is None:
            passed_over.append(path)
        else:
            rows.append(row)
    output = output or directory / TABLE_NAME
    pd.DataFrame(rows).to_csv(output, index=False)
    return output, passed_over
