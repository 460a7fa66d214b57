"""Where the tail is (design.md §8.5): evaluation results split by how often their concepts occur in the training
captions, and tables that compare models.

Words and mentions
    A caption's words are the maximal runs of word characters (regex ``\\w+``) of its lower-cased text, so
    punctuation and case never matter: "Cat." and "cat's" mention "cat", "category" does not. A name mentions
    as a phrase: its words in a row in the caption ("black-and-white" and "Black and white" both mention the
    class "black and white"). Every count is *per caption*: a caption that says a word twice counts once.

Counts and their cache
    One streaming pass over the ``.txt`` captions of a prep directory (local or a URL, read as training reads
    it) counts every word, and every multi-word class name asked for. The counts are cached as JSON keyed by
    the manifest's ``dataset_id``: ``caption_counts.json`` in a local prep directory (in the user cache
    directory when that one cannot be written), ``<cache>/caption_counts-<dataset_id>.json`` for a URL, with
    ``<cache>`` = ``$CLIP_DRO_CACHE``, else ``$XDG_CACHE_HOME/clip_dro``, else ``~/.cache/clip_dro``. A
    one-word class name is read from the word counts; a multi-word name is cached under its words joined by a
    space, and a pass runs again only for names the cache lacks. A cache of another ``dataset_id`` is stale and
    replaced.

Buckets (``zeroshot_tail`` for classes, ``retrieval_tail`` for captions)
    * terciles: items ranked by frequency, most frequent first (ties by position), split into three parts as
      equal as possible (``numpy.array_split``): ``head``, ``torso``, ``tail``;
    * log-spaced bins by decade: ``0``, ``1-9``, ``10-99``, ``100-999``, ... up to the decade of the largest
      frequency (empty bins are kept, with accuracy null);
    * Spearman's rank correlation of the per-item accuracy with log(1 + frequency) (pandas: the Pearson
      correlation of average ranks; the log does not change ranks; null when undefined, e.g. a constant side).
    Accuracies are percentages, as everywhere in evaluation.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from clip_dro.data.shard_reader import caption_lines, shard_samples
from clip_dro.errors import UserError
from clip_dro.manifest import Location, Manifest, as_location, is_url, load_manifest, write_text_atomic

CACHE_NAME = "caption_counts.json"
CACHE_VERSION = 1
BUCKETS = ("head", "torso", "tail")
# Words too common to say anything about a caption's concept (retrieval_tail's "content words" are the rest).
STOP_WORDS = frozenset("""
a an the and or but of in on at to for with without from by as into onto over under above below near
is are was were be been being has have had do does it its this that these those there here
he she they them his her their we you i my your our some any very two three
""".split())

_WORD = re.compile(r"\w+")


class TailError(UserError):
    """Inputs to the tail analysis that do not fit together; the message names them."""


# ---------------------------------------------------------------------------------------------- words


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` in order (see the module docstring)."""
    return _WORD.findall(text.lower())


def phrase_key(name: str) -> str:
    """The cache key of a name: its words joined by one space ("" for a name without words)."""
    return " ".join(words(name))


# ---------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Where counts of remote (or read-only) training sets are cached."""
    if os.environ.get("CLIP_DRO_CACHE"):
        return Path(os.environ["CLIP_DRO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clip_dro"


def _cache_paths(train_data: Location, manifest: Manifest, cache_dir: Optional[Path]) -> list[Path]:
    """Where the counts may be cached, in the order they are looked for and written."""
    in_cache = (cache_dir or default_cache_dir()) / f"caption_counts-{manifest.dataset_id}.json"
    return [in_cache] if is_url(train_data) else [Path(train_data) / CACHE_NAME, in_cache]


def _read_cache(paths: list[Path], dataset_id: str) -> Optional[dict[str, Any]]:
    """The first cache of ``dataset_id`` among ``paths``; unreadable or stale ones are ignored."""
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and data.get("dataset_id") == dataset_id:
            return data
    return None


def _write_cache(paths: list[Path], data: dict[str, Any]) -> None:
    """Write to the first path that can be written (a shared training set may be read-only)."""
    text = json.dumps(data, sort_keys=True)
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
            return
        except OSError:
            continue


# ---------------------------------------------------------------------------------------------- the pass


def _captions(train_data: Location, manifest: Manifest) -> Iterator[str]:
    """Every caption of the prep directory, shard by shard, streamed."""
    for info, location in zip(manifest.shards, manifest.shard_locations(train_data)):
        for _, key, members in shard_samples(location, info):
            yield from caption_lines(members.get("txt"), f"shard {location}, sample key {key}")


def _count_pass(train_data: Location, manifest: Manifest, phrases: Iterable[str]) -> tuple[int, Counter, Counter]:
    """(captions, word counts, phrase counts) in one pass; ``phrases`` are multi-word keys (``phrase_key``)."""
    by_first: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for phrase in set(phrases):
        split = tuple(phrase.split(" "))
        by_first[split[0]].append(split)
    word_counts: Counter = Counter()
    phrase_counts: Counter = Counter()
    captions = 0
    progress = tqdm(_captions(train_data, manifest), total=manifest.num_texts, desc="caption counts",
                    unit="caption", disable=None, leave=False)
    for caption in progress:
        tokens = words(caption)
        word_counts.update(set(tokens))
        found = {phrase for i, token in enumerate(tokens) for phrase in by_first.get(token, ())
                 if tuple(tokens[i:i + len(phrase)]) == phrase}
        phrase_counts.update(" ".join(phrase) for phrase in found)
        captions += 1
    return captions, word_counts, phrase_counts


def _counts(train_data: Location, phrases: Iterable[str] = (), cache_dir: Optional[Path] = None) -> dict[str, Any]:
    """The cached counts of ``train_data``, with every multi-word key of ``phrases``; one pass when the cache
    lacks the words or any of those phrases."""
    train_data = as_location(train_data)
    manifest = load_manifest(train_data)
    paths = _cache_paths(train_data, manifest, cache_dir)
    cached = _read_cache(paths, manifest.dataset_id)
    wanted = {p for p in phrases if " " in p}
    missing = wanted - set(cached["phrases"]) if cached else wanted
    if cached and not missing:
        return cached
    known = cached["phrases"] if cached else {}
    captions, word_counts, phrase_counts = _count_pass(train_data, manifest, missing | set(known))
    data = {"version": CACHE_VERSION, "dataset_id": manifest.dataset_id, "captions": captions,
            "words": dict(word_counts), "phrases": {p: phrase_counts.get(p, 0) for p in missing | set(known)}}
    _write_cache(paths, data)
    return data


def class_frequencies(train_data: Location, classnames: Sequence[str], cache_dir: Optional[Path] = None
                      ) -> np.ndarray:
    """For each class name, the number of training captions of the prep directory ``train_data`` that mention it
    (int64, in the order of ``classnames``; see the module docstring for the rule and the cache)."""
    keys = [phrase_key(name) for name in classnames]
    counts = _counts(train_data, keys, cache_dir)
    return np.array([counts["phrases"][k] if " " in k else counts["words"].get(k, 0) if k else 0 for k in keys],
                    dtype=np.int64)


def caption_word_frequencies(train_data: Location, cache_dir: Optional[Path] = None) -> Counter:
    """Lower-cased word -> the number of training captions of ``train_data`` holding it (cached as above)."""
    return Counter(_counts(train_data, (), cache_dir)["words"])


# ---------------------------------------------------------------------------------------------- buckets


def _maybe(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def decade_bin(frequency: int) -> int:
    """0 for 0, k for 10^(k-1) <= frequency < 10^k."""
    return len(str(int(frequency))) if frequency > 0 else 0


def _decade_label(k: int) -> str:
    return "0" if k == 0 else f"{10 ** (k - 1)}-{10 ** k - 1}"


def _group(frequency: np.ndarray, accuracy: np.ndarray, members: np.ndarray) -> dict[str, Any]:
    """Count, frequency range and mean accuracy of the items ``members``."""
    if len(members) == 0:
        return {"count": 0, "frequency_min": None, "frequency_max": None, "accuracy": None}
    return {"count": int(len(members)), "frequency_min": int(frequency[members].min()),
            "frequency_max": int(frequency[members].max()), "accuracy": float(accuracy[members].mean())}


def buckets(frequency: np.ndarray, accuracy: np.ndarray) -> dict[str, Any]:
    """Terciles, decade bins and Spearman (module docstring) of items with ``frequency`` and ``accuracy``
    (percent)."""
    frequency = np.asarray(frequency, dtype=np.int64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    order = np.argsort(-frequency, kind="stable")
    terciles = {name: _group(frequency, accuracy, part) for name, part in zip(BUCKETS, np.array_split(order, 3))}
    decade = np.array([decade_bin(f) for f in frequency], dtype=np.int64)
    top = int(decade.max()) if len(decade) else 0
    bins = [{"bin": _decade_label(k), **_group(frequency, accuracy, np.flatnonzero(decade == k))}
            for k in range(top + 1)]
    # Pearson of average ranks is Spearman's rho (Series.corr(method="spearman") would need scipy)
    spearman = pd.Series(accuracy).rank().corr(pd.Series(np.log1p(frequency)).rank())
    return {"terciles": terciles, "bins": bins, "spearman": _maybe(spearman)}


def zeroshot_tail(labels: Any, predictions: Any, frequencies: Any, classnames: Optional[Sequence[str]] = None
                  ) -> dict[str, Any]:
    """Per-class top-1 accuracy of a zero-shot evaluation against the classes' training frequencies.

    ``labels`` and ``predictions`` [N] are the true and the top-1 predicted class of each image, ``frequencies``
    [C] the count of each class (:func:`class_frequencies`). Classes without images are left out of the buckets
    (``classes_without_images``). A bucket's ``accuracy`` is the mean of its classes' accuracies; ``acc1``
    pools its images. JSON-serialisable; ``per_class`` holds what :func:`plot_zeroshot_tail` draws.
    """
    labels, predictions = np.asarray(labels, dtype=np.int64).ravel(), np.asarray(predictions, dtype=np.int64).ravel()
    frequencies = np.asarray(frequencies, dtype=np.int64).ravel()
    num_classes = len(frequencies)
    if len(labels) != len(predictions):
        raise TailError(f"zero-shot tail: {len(labels)} labels but {len(predictions)} predictions")
    if classnames is not None and len(classnames) != num_classes:
        raise TailError(f"zero-shot tail: {len(classnames)} class names but {num_classes} frequencies")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise TailError(f"zero-shot tail: label {int(outside[0])} is outside the {num_classes} classes with a "
                        "frequency")
    images = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=(labels == predictions).astype(np.float64), minlength=num_classes)
    present = np.flatnonzero(images)
    accuracy = 100.0 * hits[present] / images[present]
    report = {"unit": "class", "metric": "acc1", "classes": num_classes,
              "classes_without_images": int(num_classes - len(present)),
              **buckets(frequencies[present], accuracy)}
    for tercile, part in zip(BUCKETS, np.array_split(np.argsort(-frequencies[present], kind="stable"), 3)):
        pooled = images[present][part].sum()
        report["terciles"][tercile]["acc1"] = float(100.0 * hits[present][part].sum() / pooled) if pooled else None
    report["per_class"] = {"class": present.tolist(), "frequency": frequencies[present].tolist(),
                           "images": images[present].tolist(), "accuracy": accuracy.tolist()}
    if classnames is not None:
        report["per_class"]["name"] = [classnames[i] for i in present]
    return report


def rarest_word_frequency(caption: str, word_counts: Mapping[str, int]) -> Optional[int]:
    """The training frequency of the rarest content word (not in ``STOP_WORDS``) of ``caption``; None when it
    has none."""
    content = [w for w in words(caption) if w not in STOP_WORDS]
    return min(int(word_counts.get(w, 0)) for w in content) if content else None


def retrieval_tail(captions: Sequence[str], caption_hit_at1: Any, word_counts: Mapping[str, int]) -> dict[str, Any]:
    """Text-to-image R@1 of caption queries against the training frequency of each caption's rarest content
    word (:func:`rarest_word_frequency`, ``word_counts`` from :func:`caption_word_frequencies`).

    ``caption_hit_at1`` [M]: whether each caption's image ranked first. Captions without content words are left
    out (``captions_without_content_words``). A bucket's ``accuracy`` is its t2i R@1 in percent.
    """
    hits = np.asarray(caption_hit_at1, dtype=bool).ravel()
    if len(hits) != len(captions):
        raise TailError(f"retrieval tail: {len(captions)} captions but {len(hits)} hit flags")
    rarest = [rarest_word_frequency(c, word_counts) for c in captions]
    kept = np.array([r is not None for r in rarest], dtype=bool)
    frequency = np.array([r for r in rarest if r is not None], dtype=np.int64)
    return {"unit": "caption", "metric": "t2i_R@1", "captions": len(captions),
            "captions_without_content_words": int((~kept).sum()),
            **buckets(frequency, 100.0 * hits[kept].astype(np.float64))}


# ---------------------------------------------------------------------------------------------- plots, tables


def plot_zeroshot_tail(report: Mapping[str, Any], path: str | Path) -> Path:
    """Per-class accuracy against training frequency (symmetric log x: 0 stays on the axis), with the mean of
    each tercile drawn across its frequency range. Returns ``path``."""
    per_class = report["per_class"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(per_class["frequency"], per_class["accuracy"], s=12, alpha=0.6, color="tab:blue", label="class")
    for name, colour in zip(BUCKETS, ("tab:green", "tab:orange", "tab:red")):
        bucket = report["terciles"][name]
        if bucket["count"]:
            ax.hlines(bucket["accuracy"], bucket["frequency_min"], max(bucket["frequency_max"], 1), colors=colour,
                      linewidth=3, label=f"{name}: {bucket['accuracy']:.1f}% ({bucket['count']} classes)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("training captions mentioning the class")
    ax.set_ylabel("per-class top-1 accuracy (%)")
    spearman = report.get("spearman")
    ax.set_title("zero-shot accuracy by class frequency"
                 + (f" (Spearman {spearman:.2f})" if spearman is not None else ""))
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


HEADLINE = {"retrieval": "r_mean", "zeroshot_classification": "acc1"}


def _headline_metric(entry: Mapping[str, Any]) -> str:
    """The metric a result is plotted by: ``HEADLINE`` of its task, else its first metric."""
    return HEADLINE.get(entry.get("task"), next(iter(entry.get("metrics") or {}), ""))


def comparison_table(results_by_model: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per model, a column per ``dataset/metric`` and per ``dataset/tail:bucket`` (tercile accuracy)."""
    rows = {}
    for model, result in results_by_model.items():
        row: dict[str, float] = {}
        for entry in result.get("results", []):
            dataset = entry["dataset"]
            for metric, value in entry.get("metrics", {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"{dataset}/{metric}"] = float(value)
            for bucket in BUCKETS:
                tail = entry.get("tail") or {}
                if "terciles" in tail:
                    row[f"{dataset}/tail:{bucket}"] = tail["terciles"][bucket]["accuracy"]
        rows[model] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "model"
    return frame


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``frame`` (its index first), numbers to 2 decimals, "-" for missing."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value).replace("|", "\\|")
    header = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join([cell(index), *(cell(v) for v in row)]) + " |"
              for index, row in zip(frame.index, frame.itertuples(index=False))]
    return "\n".join(lines) + "\n"


def _bars(ax: Any, frame: pd.DataFrame, title: str, ylabel: str) -> None:
    """Grouped bars: a group per column of ``frame``, a bar per model (row)."""
    width = 0.8 / max(len(frame), 1)
    positions = np.arange(len(frame.columns))
    for i, (model, row) in enumerate(frame.iterrows()):
        ax.bar(positions + (i - (len(frame) - 1) / 2) * width, row.to_numpy(dtype=float), width, label=str(model))
    ax.set_xticks(positions, [str(c) for c in frame.columns], rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def compare_models(results_by_model: Mapping[str, Mapping[str, Any]], out_dir: str | Path
                   ) -> tuple[Path, Path, Path]:
    """Write ``comparison.csv``, ``comparison.md`` (:func:`comparison_table`) and ``comparison.png`` (the headline
    metric of each set by model — ``r_mean`` for retrieval, ``acc1`` for zero-shot — and, where results carry a
    ``tail``, tercile accuracy by model) to ``out_dir``; ``results_by_model`` maps a label to an eval result
    (``{"checkpoint" or "model": ..., "results": [...]}``). Returns the three paths."""
    if not results_by_model:
        raise TailError("compare models: no results to compare")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = comparison_table(results_by_model)
    csv_path, md_path, png_path = out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.png"
    frame.to_csv(csv_path)
    md_path.write_text(_markdown(frame), encoding="utf-8")
    headline = sorted({f"{e['dataset']}/{_headline_metric(e)}" for r in results_by_model.values()
                       for e in r.get("results", [])} & set(frame.columns))
    tail = [c for c in frame.columns if "/tail:" in c]
    fig = Figure(figsize=(6 + 4 * bool(tail), 4.5), layout="constrained")
    axes = fig.subplots(1, 1 + bool(tail), squeeze=False)[0]
    _bars(axes[0], frame[headline], "metric by model", "%")
    if tail:
        _bars(axes[1], frame[tail], "tail-bucket accuracy by model", "accuracy in the bucket (%)")
    fig.savefig(png_path, dpi=100)
    return csv_path, md_path, png_path
