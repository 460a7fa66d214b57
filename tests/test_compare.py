"""``clip-dro compare``: the grid of (loss, seed) runs, the table built from their own final evaluations,
refusals before any training, and reuse of finished runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from clip_dro.bench.launch import run
from clip_dro.compare import parse_losses, plan_runs
from clip_dro.errors import UserError
from clip_dro.resources import CONFIGS_DIR

TINY = CONFIGS_DIR / "tiny_cpu.yaml"


def _overrides(data: Path) -> list[str]:
    return [f"data.train={data / 'train'}", f"eval.retrieval=[{data / 'retrieval'}]",
            f"eval.zeroshot=[{data / 'zeroshot'}]", "train.max_steps=3", "data.batch_size=32", "data.workers=1",
            "train.warmup_steps=1", "loss.tau_warmup_steps=0", "loss.tau_min=0.01", "eval.workers=0"]


def test_plan_runs_gives_every_loss_and_seed_its_own_run(tmp_path):
    runs = plan_runs(TINY, ["clip", "isogclr"], 2, 5, tmp_path, ["train.max_steps=7", "train.lr=3e-4"])
    assert [(r.loss, r.seed) for r in runs] == [("clip", 0), ("clip", 1), ("isogclr", 0), ("isogclr", 1)]
    for r in runs:
        assert r.cfg.loss.name == r.loss and r.cfg.train.seed == r.seed and r.cfg.train.lr == 3e-4
        assert r.run_dir == tmp_path / "runs" / f"{r.loss}-seed{r.seed}"
        # --epochs clears the config's max_steps; an explicit override after it still wins.
        assert r.cfg.train.epochs == 5 and r.cfg.train.max_steps == 7
    assert plan_runs(TINY, ["clip"], 1, 5, tmp_path, [])[0].cfg.train.max_steps is None


@pytest.mark.parametrize("overrides, seeds, message", [
    (["train.seed=3"], 2, "compare sets train.seed"),
    (["train.output_dir=x"], 2, "compare sets train.output_dir"),
    (["eval.retrieval=[]", "eval.zeroshot=[]"], 2, "both empty"),
    (["loss.gamma=2"], 2, "loss.gamma"),
    ([], 0, "--seeds"),
])
def test_bad_requests_are_refused_before_training(tmp_path, overrides, seeds, message):
    with pytest.raises(UserError, match=message):
        plan_runs(TINY, ["clip", "isogclr"], seeds, None, tmp_path, overrides)
    assert not (tmp_path / "runs").exists()


def test_losses_are_parsed_and_checked():
    assert parse_losses("clip, sogclr,isogclr") == ["clip", "sogclr", "isogclr"]
    with pytest.raises(UserError, match="twice"):
        parse_losses("clip,clip")
    proc = run(["compare", "--config", str(TINY), "--losses", "clip,nope", "--seeds", "1", "--output", "/nonexistent/x"])
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _final_metrics(run_dir: Path) -> dict[str, float]:
    """The run's last evaluation per set, read from its metrics.jsonl independently of clip_dro.compare."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(x["step"] for x in lines)
    out = {}
    for x in lines:
        if "eval" in x and x["step"] == last:
            out.update({f"{x['dataset']}/{k}": v for k, v in x.items()
                        if k not in ("step", "eval", "dataset", "skipped_images")})
    return out


@pytest.mark.slow
def test_compare_tabulates_every_run_pairs_by_seed_and_reuses_finished_runs(data, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(TINY), "--losses", "clip,isogclr", "--seeds", "2", "--output", str(out),
            *_overrides(data)]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = pd.read_csv(out / "comparison.csv").set_index(["metric", "loss"])
    metrics = {loss: {seed: _final_metrics(out / "runs" / f"{loss}-seed{seed}") for seed in (0, 1)}
               for loss in ("clip", "isogclr")}
    assert {"retrieval/r_mean", "zeroshot/acc1", "retrieval/t2i_R@1"} <= set(metrics["clip"][0])
    for metric in metrics["clip"][0]:
        for loss in ("clip", "isogclr"):
            row = table.loc[(metric, loss)]
            values = [metrics[loss][s][metric] for s in (0, 1)]
            assert [row["seed_0"], row["seed_1"]] == pytest.approx(values), (metric, loss)
            assert row["mean"] == pytest.approx(sum(values) / 2)
        row = table.loc[(metric, "isogclr")]
        diffs = [metrics["isogclr"][s][metric] - metrics["clip"][s][metric] for s in (0, 1)]
        assert [row["diff_seed_0"], row["diff_seed_1"]] == pytest.approx(diffs), metric
        # Two seeds: the percentile bootstrap's ends are the two differences.
        assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((min(diffs), max(diffs)))

    # The τ-frequency correlation, per seed, only where temperatures are per sample.
    for seed in (0, 1):
        summary = json.loads((out / "temperatures" / f"isogclr-seed{seed}" / "summary.json").read_text())
        expected = summary["concept_frequency"]["image"]["spearman"]
        assert table.loc[("tau_img_freq_spearman", "isogclr")][f"seed_{seed}"] == pytest.approx(expected)
    assert math.isnan(table.loc[("tau_img_freq_spearman", "clip")]["seed_0"])

    document = json.loads((out / "comparison.json").read_text())
    assert sorted((r["loss"], r["seed"]) for r in document["runs"]) == [("clip", 0), ("clip", 1), ("isogclr", 0),
                                                                          ("isogclr", 1)]
    assert not any(r["reused"] for r in document["runs"])
    markdown = (out / "comparison.md").read_text()
    assert "| retrieval/r_mean | isogclr |" in markdown
    # Two losses: the one pair is the table's difference, in pairwise.csv and the JSON, not again in the Markdown.
    pairs = pd.read_csv(out / "pairwise.csv").set_index("metric")
    assert set(zip(pairs["loss"], pairs["versus"])) == {("isogclr", "clip")}
    for metric, pair in pairs.iterrows():
        for key in ("diff_mean", "diff_ci_low", "diff_ci_high", "diff_positive"):
            assert pair[key] == pytest.approx(table.loc[(metric, "isogclr")][key]), (metric, key)
    assert len(document["pairwise"]) == len(pairs) and "Every pair" not in markdown
    assert (out / "comparison.png").stat().st_size > 0

    finals = sorted((out / "runs").glob("*/final"))
    assert len(finals) == 4
    before = {p: p.stat().st_mtime_ns for f in finals for p in [f, *f.rglob("*")]}
    logs = {f: (f.parent / "metrics.jsonl").read_text() for f in finals}
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for f in finals for p in [f, *f.rglob("*")]} == before
    assert {f: (f.parent / "metrics.jsonl").read_text() for f in finals} == logs, "nothing trained or evaluated"
    assert all(r["reused"] for r in json.loads((out / "comparison.json").read_text())["runs"])
    assert pd.read_csv(out / "comparison.csv").equals(table.reset_index())
