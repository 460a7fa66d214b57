"""``clip-dro compare``: every (loss, seed) pair of one config trained on the same data, evaluated, and summed
up in one table with paired differences between the losses.

Each run is ``clip-dro train`` itself (the config, the user's ``key=value`` overrides, then ``loss.name``,
``train.seed`` and ``train.output_dir=OUTPUT/runs/LOSS-seedS``), evaluated by the trainer's final evaluation
on the config's eval sets, whose results the run's ``metrics.jsonl`` holds. A seed fixes the initialization
and the batch order for every loss, so the differences within a seed compare like with like
(``clip_dro.evaluation.comparison`` has the statistics and what their intervals can and cannot say).

Resumable: a run whose ``final/`` exists (written with these very settings, else refused in one line) is
reused, not retrained; an interrupted one resumes from its latest checkpoint (``train.resume=latest``).

Writes into OUTPUT: ``comparison.csv``, ``comparison.md`` and ``comparison.json`` (the table: per metric and
loss the mean ± sd over seeds, every seed's value, the differences from the first loss per seed with their
mean and bootstrap 95 % interval; the JSON adds every run's metrics), ``pairwise.csv`` (the same differences
for every pair of losses, e.g. iSogCLR − SogCLR; also in the Markdown with three losses or more and in the
JSON), ``comparison.png`` (per-seed points, lines joining a seed's runs, mean ± sd per loss) and
``temperatures/LOSS-seedS/`` (the temperature analysis of runs with per-sample temperatures).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from clip_dro.checkpoint import (MODEL_FILE, TEMPERATURES_DIR, TRAINER_STATE, CheckpointError, TrainerState,
                                 check_resumable)
from clip_dro.config import Config, load_config, parse_override
from clip_dro.data.sources import TrainSources
from clip_dro.data.train_loader import check_layout
from clip_dro.errors import UserError
from clip_dro.evaluation.comparison import LEVEL, RESAMPLES, comparison_table, pairwise_table
from clip_dro.evaluation.temperatures import analyze_temperatures
from clip_dro.resources import resolve_config_path
from clip_dro.trainer import train

# Keys compare sets for each run; an override of them would make the runs something other than the grid.
OWN_KEYS = ("loss.name", "train.seed", "train.output_dir", "train.resume")
SIDES = {"img": "image", "txt": "text"}
TEMPERATURE_METRICS = ("tau_img_mean", "tau_txt_mean", "tau_img_freq_spearman", "tau_txt_freq_spearman",
                       "tau_img_freq_spearman_per_concept", "tau_txt_freq_spearman_per_concept")
# Eval result fields that are not metrics.
_NOT_METRICS = ("step", "eval", "dataset", "skipped_images")


@dataclass(frozen=True)
class Run:
    loss: str
    seed: int
    cfg: Config

    @property
    def name(self) -> str:
        return f"{self.loss}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def temperature_row(cfg: Config, final: Path, output: Path) -> dict[str, Optional[float]]:
    """Mean τ per side and, for per-sample temperatures, their Spearman correlation with concept frequency
    (per sample and over per-concept means; None where the training data records no concepts)."""
    row: dict[str, Optional[float]] = {}
    if (final / TEMPERATURES_DIR).is_dir():
        summary = analyze_temperatures(final, cfg.data.train, output)
        freq = summary["concept_frequency"] or {}
        for short, side in SIDES.items():
            correlation = freq.get(side) or {}
            row[f"tau_{short}_mean"] = summary["distribution"][side]["mean"]
            row[f"tau_{short}_freq_spearman"] = correlation.get("spearman")
            row[f"tau_{short}_freq_spearman_per_concept"] = correlation.get("spearman_per_concept")
        return row
    # One temperature for all: CLIP's or SigLIP's learned one, or SogCLR's fixed one; no relation to frequency.
    if cfg.loss.name in ("clip", "siglip"):
        tau = math.exp(-float(torch.load(final / MODEL_FILE, weights_only=True)["logit_scale"]))
    else:
        tau = cfg.loss.tau_init
    for short in SIDES:
        row.update({f"tau_{short}_mean": tau, f"tau_{short}_freq_spearman": None,
                    f"tau_{short}_freq_spearman_per_concept": None})
    return row


def parse_losses(text: str) -> list[str]:
    losses = [name.strip() for name in text.split(",") if name.strip()]
    if not losses:
        raise UserError("--losses: give at least one loss, e.g. clip,sogclr,isogclr")
    if len(set(losses)) != len(losses):
        raise UserError(f"--losses {text}: a loss is listed twice")
    return losses


def plan_runs(config: Path, losses: Sequence[str], seeds: int, epochs: Optional[int], output: Path,
              overrides: Sequence[str]) -> list[Run]:
    """Every run's validated config, loss by loss and seed by seed; all checked before any training."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key in OWN_KEYS:
            raise UserError(f"override {text!r}: compare sets {key} for each run itself")
    length = [f"train.epochs={epochs}", "train.max_steps=null"] if epochs is not None else []
    path = resolve_config_path(config)
    runs = []
    for loss in losses:
        for seed in range(seeds):
            own = [f"loss.name={loss}", f"train.seed={seed}", f"train.output_dir={output / 'runs' / f'{loss}-seed{seed}'}",
                   "train.resume=latest"]
            runs.append(Run(loss, seed, load_config(path, [*length, *overrides, *own])))
    cfg = runs[0].cfg
    if not cfg.eval.retrieval and not cfg.eval.zeroshot:
        raise UserError("eval.retrieval and eval.zeroshot are both empty: compare needs a set to evaluate on")
    return runs


def _finished(run: Run) -> Optional[Path]:
    """The run's ``final/`` if it exists; refused when it was written with other settings or data."""
    final = run.run_dir / "final"
    if not (final / TRAINER_STATE).is_file():
        return None
    cfg = run.cfg
    sources = TrainSources(cfg.data.train)
    lanes = check_layout(sources.name, sources.num_shards, cfg.data.batch_size, 1, cfg.data.workers, cfg.data.lanes)
    check_resumable(final, cfg, sources, cfg.data.batch_size, lanes)
    return final


def final_results(run_dir: Path, step: int) -> dict[str, dict[str, Any]]:
    """The evaluation results the run logged at ``step`` (its last step), by dataset; the last line wins."""
    results: dict[str, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return results
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval" in record and record.get("step") == step:
            results[record["dataset"]] = record
    return results


def _metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"{dataset}/{key}": float(value) for dataset, record in results.items() for key, value in record.items()
            if key not in _NOT_METRICS}


def run_one(run: Run, output: Path) -> tuple[dict[str, Any], bool]:
    """Train (or reuse) one run; its row of metrics and whether it was reused."""
    cfg = run.cfg
    expected = len(cfg.eval.retrieval) + len(cfg.eval.zeroshot)
    try:
        final = _finished(run)
        results = final_results(run.run_dir, TrainerState.read(final).global_step) if final is not None else {}
        reused = len(results) >= expected
        if not reused:
            # Not trained, not finished, or its final evaluation was cut short: the trainer resumes from the
            # latest checkpoint (from final/ it only evaluates).
            final = train(cfg)
            results = final_results(run.run_dir, TrainerState.read(final).global_step)
    except CheckpointError as exc:
        raise UserError(f"{run.run_dir} holds a run with other settings ({exc}); choose another --output or "
                        "delete it") from None
    if len(results) < expected:
        raise UserError(f"{run.run_dir}/metrics.jsonl: {len(results)} of the {expected} final evaluations found")
    row: dict[str, Any] = {"loss": run.loss, "seed": run.seed, **_metrics(results)}
    row.update(temperature_row(cfg, final, output / "temperatures" / run.name))
    return row, reused


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def _signed(value: float) -> str:
    return "–" if not math.isfinite(value) else ("+" if value > 0 else "") + _fmt(value)


def _difference(row: dict[str, Any]) -> str:
    """A row's mean paired difference with its bootstrap interval, where there is one: "+0.85 [+0.65, +1.16]"."""
    interval = (f" [{_signed(row['diff_ci_low'])}, {_signed(row['diff_ci_high'])}]"
                if math.isfinite(row["diff_ci_low"]) else "")
    return _signed(row["diff_mean"]) + interval


def markdown(table: pd.DataFrame, seeds: int, baseline: str) -> str:
    lines = [f"| metric | loss | mean ± sd | per seed (0–{seeds - 1}) | {baseline} → loss per seed | "
             "mean difference [95 % CI] | seeds above |",
             "|---|---|---:|---|---|---:|---:|"]
    for row in table.to_dict("records"):
        values = ", ".join(_fmt(row[f"seed_{s}"]) for s in range(seeds))
        if row["loss"] == baseline or not math.isfinite(row["diff_mean"]):
            diffs, summary, above = "–", "–", "–"
        else:
            diffs = ", ".join(_signed(row[f"diff_seed_{s}"]) for s in range(seeds))
            summary = _difference(row)
            above = f"{int(row['diff_positive'])}/{int(row['n_seeds'])}"
        spread = "–" if not math.isfinite(row["mean"]) else f"{_fmt(row['mean'])} ± {_fmt(row['sd'])}"
        lines.append(f"| {row['metric']} | {row['loss']} | {spread} | {values} | {diffs} | {summary} | {above} |")
    return "\n".join(lines) + "\n"


def pairwise_markdown(pairs: pd.DataFrame) -> str:
    """The differences between robust losses too: a row per (metric, later loss − earlier loss)."""
    lines = ["| metric | difference | mean [95 % CI] | seeds above |", "|---|---|---:|---:|"]
    for row in pairs.to_dict("records"):
        lines.append(f"| {row['metric']} | {row['loss']} − {row['versus']} | {_difference(row)} "
                     f"| {int(row['diff_positive'])}/{int(row['n_pairs'])} |")
    return "\n".join(lines) + "\n"


def plot(runs: pd.DataFrame, losses: Sequence[str], metrics: Sequence[str], path: Path, title: str) -> None:
    """Per metric: each seed's value per loss (a seed's runs joined by a line) and the mean ± sd."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(metrics), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(losses))
    for ax, metric in zip(axes, metrics):
        table = runs.pivot(index="seed", columns="loss", values=metric)[list(losses)]
        for i, (seed, values) in enumerate(table.iterrows()):
            ax.plot(x, values.to_numpy(dtype=float), "o-", color="tab:blue", alpha=0.35, ms=4, lw=0.8,
                    label="one seed" if i == 0 else None)
        ax.errorbar(x, table.mean().to_numpy(), yerr=table.std(ddof=1).fillna(0).to_numpy(), fmt="s",
                    color="black", ms=6, capsize=4, label="mean ± sd")
        ax.set_xticks(x, losses)
        ax.set_xlim(-0.5, len(losses) - 0.5)
        ax.set_title(metric)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_compare(config: Path, losses: str | Sequence[str], seeds: int, output: Path, epochs: Optional[int] = None,
                overrides: Sequence[str] = (), resamples: int = RESAMPLES) -> pd.DataFrame:
    """Train and evaluate every (loss, seed), write the table and plot into ``output``; returns the table."""
    losses = parse_losses(losses) if isinstance(losses, str) else list(losses)
    output = Path(output)
    runs = plan_runs(Path(config), losses, seeds, epochs, output, overrides)
    rows, reused = [], []
    with tqdm(runs, desc="compare", unit="run", dynamic_ncols=True) as bar:
        for run in bar:
            bar.set_postfix_str(run.name)
            row, was_reused = run_one(run, output)
            if was_reused:
                tqdm.write(f"{run.name}: finished before, reused ({run.run_dir / 'final'})")
            rows.append(row)
            reused.append(was_reused)
    frame = pd.DataFrame(rows)
    evaluated = [c for c in frame.columns if "/" in c]
    metrics = evaluated + [m for m in TEMPERATURE_METRICS if m in frame.columns]
    table = comparison_table(frame, losses, metrics, resamples=resamples)
    table.to_csv(output / "comparison.csv", index=False)
    pairs = pairwise_table(frame, losses, metrics, resamples=resamples)
    pairs.to_csv(output / "pairwise.csv", index=False)
    text = markdown(table, seeds, losses[0])
    if len(losses) > 2:  # with two, the pairs are the table's differences
        text += "\nEvery pair of losses, paired by seed:\n\n" + pairwise_markdown(pairs)
    (output / "comparison.md").write_text(text)
    document = {
        "config": str(config), "losses": losses, "seeds": list(range(seeds)), "epochs": epochs,
        "overrides": list(overrides), "baseline": losses[0], "bootstrap": {"resamples": resamples, "level": LEVEL,
                                                                          "seed": 0},
        "runs": [{"loss": r["loss"], "seed": r["seed"], "run_dir": str(run.run_dir), "reused": was,
                  "metrics": {k: _json_safe(v) for k, v in r.items() if k not in ("loss", "seed")}}
                 for r, run, was in zip(rows, runs, reused)],
        "table": [{k: _json_safe(v) for k, v in record.items()} for record in table.to_dict("records")],
        "pairwise": [{k: _json_safe(v) for k, v in record.items()} for record in pairs.to_dict("records")],
    }
    (output / "comparison.json").write_text(json.dumps(document, indent=2) + "\n")
    main = [m for m in evaluated if m.endswith(("/r_mean", "/acc1"))] or evaluated[:4]
    plot(frame, losses, main, output / "comparison.png",
         f"{Path(config).name}: {len(losses)} losses × {seeds} seeds" + (f", {epochs} epochs" if epochs else ""))
    print(text)
    print(f"written: {output / 'comparison.csv'}, {output / 'comparison.md'}, {output / 'comparison.json'}, "
          f"{output / 'pairwise.csv'}, {output / 'comparison.png'}")
    return table
