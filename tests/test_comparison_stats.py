"""The statistics of ``clip-dro compare`` (clip_dro.evaluation.comparison) against independent computations:
Python's statistics module, the exact bootstrap distribution enumerated over every resample, scipy."""
from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from clip_dro.evaluation.comparison import (bootstrap_ci, comparison_table, mean_sd, paired_differences,
                                           pairwise_table)


def test_mean_sd_is_the_sample_statistics_of_the_finite_values():
    values = [91.0, 85.24, float("nan"), 87.88]
    mean, sd = mean_sd(values)
    assert mean == pytest.approx(statistics.mean([91.0, 85.24, 87.88]))
    assert sd == pytest.approx(statistics.stdev([91.0, 85.24, 87.88]))
    assert mean_sd([3.5]) == (3.5, 0.0)
    assert all(math.isnan(v) for v in mean_sd([float("nan")]))


def _exact_percentile_interval(d: list[float], level: float) -> tuple[float, float]:
    """The quantiles of the bootstrap distribution of the mean, from all n^n equally likely resamples."""
    means = np.sort([np.mean(pick) for pick in itertools.product(d, repeat=len(d))])
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@pytest.mark.parametrize("d", [[1.4, 0.8, 0.9, -0.2], [3.4, 1.6, 4.0, 2.2, -1.0]])
def test_bootstrap_interval_matches_the_exact_bootstrap_distribution(d):
    low, high = bootstrap_ci(d, resamples=20_000, seed=3)
    exact_low, exact_high = _exact_percentile_interval(d, 0.95)
    # Monte Carlo error of a 2.5 % quantile with 20k draws, in units of the spread of the differences.
    tolerance = 0.08 * (max(d) - min(d))
    assert low == pytest.approx(exact_low, abs=tolerance) and high == pytest.approx(exact_high, abs=tolerance)
    assert low <= np.mean(d) <= high


def test_bootstrap_interval_of_two_seeds_spans_the_two_differences():
    # Resample means of (a, b): a with probability 1/4, (a+b)/2 with 1/2, b with 1/4.
    assert bootstrap_ci([-1.0, 2.0], seed=0) == (-1.0, 2.0)


def test_bootstrap_interval_is_seeded_and_degenerate_cases_are_explicit():
    d = [0.5, -0.3, 1.2, 0.7, 0.1]
    assert bootstrap_ci(d, seed=7) == bootstrap_ci(d, seed=7)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    stats = pytest.importorskip("scipy.stats")
    d = np.random.default_rng(0).normal(1.0, 2.0, size=12)
    ours = bootstrap_ci(d, resamples=20_000, seed=1)
    theirs = stats.bootstrap((d,), np.mean, n_resamples=20_000, method="percentile",
                             random_state=np.random.default_rng(2)).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.1)


def _runs() -> pd.DataFrame:
    rows = []
    values = {"clip": [91.0, 85.24, 87.88], "sogclr": [94.41, 86.79, 91.89], "isogclr": [94.99, 86.93, 91.88]}
    for loss, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            rows.append({"loss": loss, "seed": seed, "r_mean": v,
                         "spearman": 0.05 * (seed + 1) if loss == "isogclr" else np.nan})
    # Runs in another order than the seeds: differences must pair by seed, not by position.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_paired_differences_pair_by_seed():
    diff = paired_differences(_runs(), "isogclr", "clip", "r_mean")
    assert list(diff.index) == [0, 1, 2]
    assert diff.to_numpy() == pytest.approx([94.99 - 91.0, 86.93 - 85.24, 91.88 - 87.88])


def test_paired_differences_refuse_two_runs_of_one_seed():
    runs = pd.concat([_runs(), pd.DataFrame([{"loss": "clip", "seed": 0, "r_mean": 1.0}])])
    with pytest.raises(ValueError, match="more than one run per seed"):
        paired_differences(runs, "isogclr", "clip", "r_mean")


def test_comparison_table_rows():
    table = comparison_table(_runs(), ["clip", "sogclr", "isogclr"], ["r_mean", "spearman"]).set_index(
        ["metric", "loss"])
    sog = table.loc[("r_mean", "sogclr")]
    assert sog["n_seeds"] == 3 and sog["mean"] == pytest.approx(statistics.mean([94.41, 86.79, 91.89]))
    assert sog["sd"] == pytest.approx(statistics.stdev([94.41, 86.79, 91.89]))
    assert [sog[f"seed_{s}"] for s in range(3)] == [94.41, 86.79, 91.89]
    expected = [94.41 - 91.0, 86.79 - 85.24, 91.89 - 87.88]
    assert [sog[f"diff_seed_{s}"] for s in range(3)] == pytest.approx(expected)
    assert sog["diff_mean"] == pytest.approx(np.mean(expected)) and sog["diff_positive"] == 3
    assert (sog["diff_ci_low"], sog["diff_ci_high"]) == bootstrap_ci(expected)
    clip = table.loc[("r_mean", "clip")]
    assert math.isnan(clip["diff_mean"]) and math.isnan(clip["diff_ci_low"])
    # A metric only one loss has: its own mean and sd, no difference against a baseline without values.
    spearman = table.loc[("spearman", "isogclr")]
    assert spearman["mean"] == pytest.approx(0.1) and spearman["n_seeds"] == 3
    assert math.isnan(spearman["diff_mean"]) and table.loc[("spearman", "clip")]["n_seeds"] == 0


def test_pairwise_table_has_every_pair_and_agrees_with_the_baseline_columns():
    losses, metrics = ["clip", "sogclr", "isogclr"], ["r_mean", "spearman"]
    pairs = pairwise_table(_runs(), losses, metrics).set_index(["metric", "loss", "versus"])
    # r_mean: the three pairs; spearman: none (only isogclr has values)
    assert sorted(pairs.index) == [("r_mean", "isogclr", "clip"), ("r_mean", "isogclr", "sogclr"),
                                   ("r_mean", "sogclr", "clip")]
    expected = [94.99 - 94.41, 86.93 - 86.79, 91.88 - 91.89]  # isogclr − sogclr, seeds 0-2, by hand
    row = pairs.loc[("r_mean", "isogclr", "sogclr")]
    assert row["n_pairs"] == 3 and row["diff_mean"] == pytest.approx(np.mean(expected))
    assert (row["diff_ci_low"], row["diff_ci_high"]) == bootstrap_ci(expected) and row["diff_positive"] == 2
    table = comparison_table(_runs(), losses, metrics).set_index(["metric", "loss"])
    for loss in ("sogclr", "isogclr"):
        got, want = pairs.loc[("r_mean", loss, "clip")], table.loc[("r_mean", loss)]
        for key in ("diff_mean", "diff_ci_low", "diff_ci_high", "diff_positive"):
            assert got[key] == want[key], (loss, key)
