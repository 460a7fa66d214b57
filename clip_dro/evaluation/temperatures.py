"""Analysis of learned per-sample temperatures (design.md §8.4): their distribution, and their relation to concept
frequency where the training data records it (the paper's claim: frequent semantics get larger τ).

Inputs: a checkpoint's temperatures, read by ``clip_dro.checkpoint.read_temperatures``: its per-shard
``temperatures/shard-R-of-W.npz`` (arrays ``image_index``, ``image_tau``, ``text_index``, ``text_tau``), or a
``temperatures.csv`` (columns ``side,index,tau``; side ``image`` or ``text``, index the global image or text
index); and optionally the training prep directory (or the list of them a run trained on: their indices are
made global as the trainer made them, ``clip_dro.data.sources``), whose samples' ``.json`` record ``concept``
and ``concept_frequency`` (the synthetic set does). Only the ``.json`` members are read.

Outputs in ``output_dir``: ``tau_histogram.png``; with concepts also ``tau_vs_frequency.png`` (every sample
and the per-concept mean τ against frequency) and ``per_concept.csv`` (per concept: frequency, counts and
mean τ per side); always ``summary.json`` (the returned dict). The correlation is Spearman's: the Pearson
correlation of pandas average ranks, computed per sample and over the per-concept means.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from clip_dro.checkpoint import SIDES, TemperatureError, read_temperatures
from clip_dro.data.eval_sets import iter_sample_json, require_dir
from clip_dro.data.sources import TrainSources

_MAX_SCATTER_POINTS = 20000
# Means of equal temperatures can differ in their last bits (0.05 x 3 / 3 != 0.05); unrounded, they would rank
# as different values.
_MEAN_DECIMALS = 12


TrainDirs = str | Path | Sequence[str | Path]


def _directories(train_dir: TrainDirs) -> list[str | Path]:
    return [train_dir] if isinstance(train_dir, (str, Path)) else list(train_dir)


def read_concepts(train_dir: TrainDirs) -> Optional[dict[str, pd.DataFrame]]:
    """Per side, a frame global index -> (concept, concept_frequency) from the training samples' ``.json``
    (of every source, indices shifted by the source's offsets); None when a source does not record concepts."""
    directories = _directories(train_dir)
    if len(directories) == 1:
        return _source_concepts(directories[0])
    frames: dict[str, list[pd.DataFrame]] = {side: [] for side in SIDES}
    for source in TrainSources(directories).sources:
        concepts = _source_concepts(source.location)
        if concepts is None:
            return None
        for side, offset in (("image", source.image_offset), ("text", source.text_offset)):
            frames[side].append(concepts[side].assign(index=concepts[side]["index"] + offset))
    return {side: pd.concat(f, ignore_index=True) for side, f in frames.items()}


def _source_concepts(train_dir: str | Path) -> Optional[dict[str, pd.DataFrame]]:
    """``read_concepts`` of one prep directory, with its own indices."""
    train_dir = require_dir(train_dir, "training set")
    rows: dict[str, list[tuple]] = {"image": [], "text": []}
    for number, meta in enumerate(iter_sample_json(train_dir)):
        if number == 0 and not {"concept", "concept_frequency"} <= set(meta):
            return None
        if not {"concept", "concept_frequency", "image_index", "text_index"} <= set(meta):
            raise TemperatureError(f"training set {train_dir}: sample index {meta.get('index')!r} lacks one of "
                                   "concept, concept_frequency, image_index, text_index in its .json")
        concept, frequency = meta["concept"], float(meta["concept_frequency"])
        rows["image"].append((meta["image_index"], concept, frequency))
        rows["text"].extend((t, concept, frequency) for t in meta["text_index"])
    return {side: pd.DataFrame(r, columns=["index", "concept", "concept_frequency"]).drop_duplicates("index")
            for side, r in rows.items()}


def spearman(x: pd.Series, y: pd.Series) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    r = x.rank().corr(y.rank())
    return None if pd.isna(r) else float(r)


def _distribution(tau: pd.Series) -> dict[str, float]:
    d = tau.describe()
    return {"count": int(d["count"]), "mean": float(d["mean"]), "std": float(d["std"]) if d["count"] > 1 else 0.0,
            "min": float(d["min"]), "p25": float(d["25%"]), "median": float(d["50%"]), "p75": float(d["75%"]),
            "max": float(d["max"])}


def _plot_histograms(taus: dict[str, pd.Series], path: Path) -> None:
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, side in zip(fig.subplots(1, 2), SIDES):
        ax.hist(taus[side], bins=50, color="tab:blue" if side == "image" else "tab:orange")
        ax.set_xlabel(f"τ_{'img' if side == 'image' else 'txt'}")
        ax.set_ylabel("count")
        ax.set_title(f"{side} temperatures (n={len(taus[side])})")
    fig.savefig(path, dpi=100)


def _plot_frequency(joined: dict[str, pd.DataFrame], per_concept: pd.DataFrame, correlations: dict[str, Any],
                    path: Path) -> None:
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, side in zip(fig.subplots(1, 2), SIDES):
        frame = joined[side]
        shown = frame.sample(_MAX_SCATTER_POINTS, random_state=0) if len(frame) > _MAX_SCATTER_POINTS else frame
        ax.scatter(shown["concept_frequency"], shown["tau"], s=4, alpha=0.2, label="samples")
        means = per_concept.dropna(subset=[f"tau_{side}_mean"]).sort_values("concept_frequency")
        ax.plot(means["concept_frequency"], means[f"tau_{side}_mean"], "o", color="black", ms=4,
                label="per-concept mean")
        if (frame["concept_frequency"] > 0).all():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        rho = correlations[side]["spearman"]
        ax.set_title(f"{side}: Spearman ρ = {rho:.3f}" if rho is not None else f"{side}: Spearman ρ undefined")
        ax.set_xlabel("concept frequency")
        ax.set_ylabel("τ")
        ax.legend()
    fig.savefig(path, dpi=100)


def _join(temps: pd.DataFrame, concepts: pd.DataFrame, side: str, source: Path, train_dir: str) -> pd.DataFrame:
    joined = temps.merge(concepts, on="index", how="left")
    unknown = joined["concept_frequency"].isna()
    if unknown.any():
        raise TemperatureError(f"{source}: {int(unknown.sum())} {side} indices (e.g. "
                               f"{int(joined['index'][unknown].iloc[0])}) are not in training set {train_dir}; "
                               "is it the set this run was trained on?")
    return joined


def analyze_temperatures(temperatures: str | Path, train_dir: Optional[TrainDirs],
                         output_dir: str | Path) -> dict[str, Any]:
    """Write the plots, tables and ``summary.json`` described in the module docstring; return the summary.
    ``temperatures`` as in :func:`read_temperatures`."""
    temperatures = Path(temperatures)
    temps = read_temperatures(temperatures)
    concepts = read_concepts(train_dir) if train_dir is not None else None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    taus = {side: temps.loc[temps["side"] == side, ["index", "tau"]] for side in SIDES}
    _plot_histograms({side: t["tau"] for side, t in taus.items()}, output_dir / "tau_histogram.png")
    summary: dict[str, Any] = {
        "temperatures": str(temperatures),
        "train_dir": " + ".join(map(str, _directories(train_dir))) if train_dir is not None else None,
        "distribution": {side: _distribution(t["tau"]) for side, t in taus.items() if len(t)},
        "concept_frequency": None,
        "files": ["tau_histogram.png"],
    }
    if concepts is not None:
        joined = {side: _join(taus[side], concepts[side], side, temperatures, summary["train_dir"]) for side in SIDES}
        per_side = [j.groupby(["concept", "concept_frequency"])["tau"].agg(["count", "mean"])
                    .rename(columns={"count": f"num_{side}", "mean": f"tau_{side}_mean"}) for side, j in joined.items()]
        per_concept = (pd.concat(per_side, axis=1).round(_MEAN_DECIMALS).reset_index()
                       .sort_values("concept_frequency", ascending=False, kind="stable"))
        correlations = {side: {
            "spearman": spearman(joined[side]["concept_frequency"], joined[side]["tau"]),
            "spearman_per_concept": spearman(per_concept["concept_frequency"], per_concept[f"tau_{side}_mean"]),
            "num_concepts": int(per_concept[f"tau_{side}_mean"].notna().sum()),
        } for side in SIDES}
        per_concept.to_csv(output_dir / "per_concept.csv", index=False)
        _plot_frequency(joined, per_concept, correlations, output_dir / "tau_vs_frequency.png")
        summary["concept_frequency"] = correlations
        summary["files"] += ["tau_vs_frequency.png", "per_concept.csv"]
    summary["files"].append("summary.json")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
