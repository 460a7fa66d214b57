"""The quickstart on a shrunken budget: every loss trained, evaluated and compared, files written."""
import json
import math

import pandas as pd
import pytest
import torch

from clip_dro.errors import UserError

from clip_dro.quickstart import LOSSES, TABLE_METRICS, run_quickstart

pytestmark = pytest.mark.slow  # trains every loss


def test_quickstart_writes_a_consistent_comparison(tmp_path):
    table = run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch")
    written = json.loads((tmp_path / "comparison.json").read_text())
    assert written == json.loads(json.dumps(table)) and list(written) == list(LOSSES)
    for loss, row in written.items():
        assert set(TABLE_METRICS) <= set(row), loss
        recalls = [row[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
        assert math.isclose(row["r_mean"], sum(recalls) / 6)
        assert all(0 <= r <= 100 for r in recalls) and 0 <= row["acc1"] <= 100
    runs = tmp_path / "runs"
    taus = pd.read_csv(runs / "isogclr/final/temperatures.csv")
    assert math.isclose(written["isogclr"]["tau_img_mean"], taus[taus.side == "image"].tau.mean(), rel_tol=1e-6)
    # Two steps leave τ inside its warm-up, so the correlation is undefined; it must come from the analysis.
    summary = json.loads((tmp_path / "temperatures/isogclr/summary.json").read_text())
    for side, short in (("image", "img"), ("text", "txt")):
        for suffix, field in (("", "spearman"), ("_per_concept", "spearman_per_concept")):
            key = f"tau_{short}_freq_spearman{suffix}"
            assert key in written["isogclr"] and written["sogclr"][key] is None
            assert written["isogclr"][key] == summary["concept_frequency"][side][field]
    assert written["sogclr"]["tau_img_mean"] == 0.05 and written["sogclr"]["tau_img_freq_spearman"] is None
    logit_scale = torch.load(runs / "clip/final/model.pt")["logit_scale"]
    assert math.isclose(written["clip"]["tau_txt_mean"], math.exp(-float(logit_scale)), rel_tol=1e-6)
    markdown = (tmp_path / "comparison.md").read_text().splitlines()
    assert markdown[0] == "| metric | clip | sogclr | isogclr |" and len(markdown) == 2 + len(TABLE_METRICS)
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "temperatures/isogclr/tau_vs_frequency.png").is_file()

    # Over the same directory: the same settings resume (nothing retrained, the same table); other settings
    # are refused in one line instead of reporting the old runs as new.
    assert run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch") == table
    with pytest.raises(UserError, match=r"holds a quickstart run with other settings .*train.max_steps = 2, "
                                        r"this run has 3"):
        run_quickstart(tmp_path, steps=3, num_train=480, setup="scratch")
    with pytest.raises(UserError, match=r"other settings .*train.seed = 0, this run has 1"):
        run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch", seed=1)
    with pytest.raises(UserError, match="already holds another dataset"):
        run_quickstart(tmp_path, steps=2, num_train=400, setup="scratch")
    assert json.loads((tmp_path / "comparison.json").read_text()) == written


def test_pretrained_setup_fine_tunes_the_pretrained_towers(tmp_path):
    table = run_quickstart(tmp_path, steps=2, num_train=480, setup="pretrained")
    assert list(table) == list(LOSSES) and all(0 <= row["r_mean"] <= 100 for row in table.values())
    config = (tmp_path / "runs/isogclr/config.yaml").read_text()
    assert "efficientnet-lite0-minilm" in config and "package:efficientnet_lite0" in config
    with pytest.raises(UserError, match="holds a quickstart run with other settings .*model.name"):
        run_quickstart(tmp_path, steps=2, num_train=480, setup="scratch")
