"""Statistics of a comparison of losses over seeds (``clip-dro compare``): pure functions of a table of runs.

Input: one row per run with columns ``loss``, ``seed`` and one column per metric (NaN where a run has no value,
e.g. the τ–frequency Spearman of a loss without per-sample temperatures). Output: one long table with a row
per (metric, loss): the number of seeds, mean and sample standard deviation (ddof 1) over seeds, the value of
every seed, and, for each loss but the baseline (the first listed), the paired differences loss − baseline
of the same seed with their mean and a bootstrap 95 % interval. A second table holds the same difference
statistics for every pair of losses (each later-listed loss against each earlier one), so that a comparison
between two robust losses, not only against the baseline, is read from a file and not computed by hand.

Why paired: a seed fixes the initialization and the batch order for every loss, so the difference within a
seed compares like with like, and its spread is usually far smaller than the spread of each loss over seeds.

The interval is the percentile bootstrap of the mean difference: ``resamples`` resamples of the per-seed
differences, drawn with replacement by a generator seeded with ``seed``, so the same runs give the same
interval. With few seeds it is wide and coarse (with 2 seeds its ends are the two differences themselves;
with 1 seed there is no interval), and it understates the uncertainty, because the bootstrap cannot see
variation that a handful of seeds did not happen to show: read it as a summary of these seeds, not a test.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

RESAMPLES = 10_000
LEVEL = 0.95


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value) of the finite values; NaN, NaN
    when there are none."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def bootstrap_ci(differences: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (NaN, NaN with fewer than 2 values)."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_differences(runs: pd.DataFrame, loss: str, baseline: str, metric: str) -> pd.Series:
    """``loss`` − ``baseline`` in ``metric``, per seed present (with a value) for both, indexed by seed."""
    def by_seed(name: str) -> pd.Series:
        rows = runs[runs["loss"] == name]
        if rows["seed"].duplicated().any():
            raise ValueError(f"loss {name}: more than one run per seed")
        return rows.set_index("seed")[metric].astype(float)

    return (by_seed(loss) - by_seed(baseline)).dropna().sort_index()


def _difference_row(diff: pd.Series, resamples: int, level: float, seed: int) -> dict[str, float]:
    """Mean, bootstrap interval and count of positive values of per-seed differences (NaN where there are none)."""
    low, high = bootstrap_ci(diff.to_numpy(), resamples, level, seed)
    return {"diff_mean": float(diff.mean()) if len(diff) else float("nan"), "diff_ci_low": low,
            "diff_ci_high": high, "diff_positive": int((diff > 0).sum()) if len(diff) else np.nan}


def comparison_table(runs: pd.DataFrame, losses: Sequence[str], metrics: Sequence[str],
                     resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """The long table described in the module docstring; ``losses[0]`` is the baseline. Columns: metric,
    loss, n_seeds, mean, sd, ``seed_S`` (each seed's value), diff_mean, diff_ci_low, diff_ci_high,
    diff_positive (seeds where the loss is above the baseline), ``diff_seed_S``."""
    baseline = losses[0]
    seeds = sorted(int(s) for s in runs["seed"].unique())
    rows = []
    for metric in metrics:
        for loss in losses:
            values = runs[runs["loss"] == loss].set_index("seed")[metric].astype(float)
            mean, sd = mean_sd(values.to_numpy())
            row: dict[str, Optional[float] | str | int] = {
                "metric": metric, "loss": loss, "n_seeds": int(values.notna().sum()), "mean": mean, "sd": sd}
            row.update({f"seed_{s}": float(values.get(s, np.nan)) for s in seeds})
            diff = (paired_differences(runs, loss, baseline, metric) if loss != baseline
                    else pd.Series(dtype=float))
            row.update(_difference_row(diff, resamples, level, seed))
            row.update({f"diff_seed_{s}": float(diff.get(s, np.nan)) for s in seeds})
            rows.append(row)
    return pd.DataFrame(rows)


def pairwise_table(runs: pd.DataFrame, losses: Sequence[str], metrics: Sequence[str],
                   resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Every pair of losses: a row per (metric, loss, versus) for each loss listed after ``versus``, with
    n_pairs (seeds with a value for both), diff_mean, diff_ci_low, diff_ci_high and diff_positive of loss −
    versus. Pairs without a common seed (a metric one of them lacks) are left out."""
    rows = []
    for metric in metrics:
        for i, versus in enumerate(losses):
            for loss in losses[i + 1:]:
                diff = paired_differences(runs, loss, versus, metric)
                if len(diff):
                    rows.append({"metric": metric, "loss": loss, "versus": versus, "n_pairs": len(diff),
                                 **_difference_row(diff, resamples, level, seed)})
    columns = ["metric", "loss", "versus", "n_pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "diff_positive"]
    return pd.DataFrame(rows, columns=columns)
