"""The quickstart on a shrunken budget: every (loss, seed) trained on the synthetic data, evaluated on its
held-out sets and compared; resumable and refusing other settings."""
import itertools
import json
import math

import pandas as pd
import pytest
import torch
import yaml

from clip_dro.errors import UserError
from clip_dro.quickstart import LOSSES, run_quickstart
from clip_dro.resources import CONFIGS_DIR

pytestmark = pytest.mark.slow  # trains every loss


def _runs(output) -> dict[tuple[str, int], dict]:
    return {(r["loss"], r["seed"]): r for r in json.loads((output / "comparison.json").read_text())["runs"]}


def test_quickstart_compares_every_loss_over_paired_seeds(tmp_path):
    table = run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch", seeds=2)
    runs = _runs(tmp_path)
    assert sorted(runs) == sorted(itertools.product(LOSSES, range(2)))
    for (loss, seed), run in runs.items():
        config = yaml.safe_load((tmp_path / f"runs/{loss}-seed{seed}/config.yaml").read_text())
        assert config["data"]["train"] == [str(tmp_path / "data/train")] and config["train"]["seed"] == seed
        assert config["eval"]["zeroshot"] == [str(tmp_path / "data/zeroshot")] and config["model"]["name"] == "tiny-vit"
        metrics = run["metrics"]
        recalls = [metrics[f"retrieval/{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
        assert math.isclose(metrics["retrieval/r_mean"], sum(recalls) / 6)
        assert 0 <= metrics["zeroshot/acc1"] <= 100
    # The table is the runs' statistics: mean over seeds, and the paired difference from CLIP seed by seed.
    written = pd.read_csv(tmp_path / "comparison.csv")
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    row = table[(table.metric == "zeroshot/acc1") & (table.loss == "isogclr")].iloc[0]
    values = [runs[("isogclr", s)]["metrics"]["zeroshot/acc1"] for s in range(2)]
    assert row["mean"] == pytest.approx(sum(values) / 2)
    assert row["diff_seed_1"] == pytest.approx(values[1] - runs[("clip", 1)]["metrics"]["zeroshot/acc1"])
    # Temperatures: iSogCLR's from its temperatures.csv, SogCLR's fixed, CLIP's learned one from model.pt.
    taus = pd.read_csv(tmp_path / "runs/isogclr-seed0/final/temperatures.csv")
    assert runs[("isogclr", 0)]["metrics"]["tau_img_mean"] == pytest.approx(taus[taus.side == "image"].tau.mean())
    assert runs[("sogclr", 0)]["metrics"]["tau_img_mean"] == 0.05
    logit_scale = torch.load(tmp_path / "runs/clip-seed1/final/model.pt")["logit_scale"]
    assert runs[("clip", 1)]["metrics"]["tau_txt_mean"] == pytest.approx(math.exp(-float(logit_scale)))
    assert "| zeroshot/acc1 | isogclr |" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "temperatures/isogclr-seed1/tau_vs_frequency.png").is_file()

    # Over the same directory: the same settings reuse every run (the same table); other settings are refused
    # in one line instead of reporting the old runs as new.
    again = run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch", seeds=2)
    pd.testing.assert_frame_equal(again, table)
    assert all(r["reused"] for r in _runs(tmp_path).values())
    with pytest.raises(UserError, match=r"holds a run with other settings .*train.max_steps = 2, this run has 3"):
        run_quickstart(tmp_path, steps=3, num_train=480, setup="scratch", seeds=2)
    with pytest.raises(UserError, match="already holds another dataset"):
        run_quickstart(tmp_path, steps=2, num_train=400, setup="scratch", seeds=2)


def test_default_setup_trains_heads_on_locked_towers_from_the_feature_cache(tmp_path):
    table = run_quickstart(tmp_path, steps=2, num_train=480, seeds=1)
    assert set(table.loss) == set(LOSSES)
    config = yaml.safe_load((tmp_path / "runs/isogclr-seed0/config.yaml").read_text())
    assert config["model"]["lock_image"] and config["model"]["lock_text"]
    assert config["model"]["name"] == "efficientnet-lite0-minilm" and config["data"]["feature_cache"] == "dataset"
    # The shipped configs/locked_cpu.yaml itself was trained: its model and learning rate, the quickstart's data.
    shipped = yaml.safe_load((CONFIGS_DIR / "locked_cpu.yaml").read_text())
    assert {key: config["model"][key] for key in shipped["model"]} == shipped["model"]
    assert config["train"]["lr"] == shipped["train"]["lr"] and config["train"]["epochs"] == shipped["train"]["epochs"]
    caches = list((tmp_path / "data/train/feature_cache").glob("*/meta.json"))
    assert len(caches) == 1 and json.loads(caches[0].read_text())["complete"]  # one cache, shared by the losses
    with pytest.raises(UserError, match="holds a run with other settings .*model.name"):
        run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch", seeds=1)


def test_pretrained_setup_fine_tunes_the_pretrained_towers(tmp_path):
    table = run_quickstart(tmp_path, steps=2, num_train=480, setup="pretrained")
    assert set(table.loss) == set(LOSSES) and set(_runs(tmp_path)) == {(loss, 0) for loss in LOSSES}
    config = yaml.safe_load((tmp_path / "runs/isogclr-seed0/config.yaml").read_text())
    assert config["model"]["pretrained_image"] == "package:efficientnet_lite0" and not config["model"]["lock_image"]
