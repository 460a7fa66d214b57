"""Temperature analysis: distributions, relation to concept frequency, outputs, bad inputs."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from clip_dro.checkpoint import TemperatureError, read_temperatures
from clip_dro.evaluation.temperatures import analyze_temperatures, spearman
from evalgen import make_retrieval_set, make_train_set

FREQUENCIES = {"circle": 0.6, "square": 0.25, "star": 0.1, "moon": 0.05, "heart": 0.05}


def _write_csv(path, metas, tau_image, tau_text):
    rows = [("image", m["image_index"], tau_image(m)) for m in metas]
    rows += [("text", t, tau_text(m, t)) for m in metas for t in m["text_index"]]
    pd.DataFrame(rows, columns=["side", "index", "tau"]).to_csv(path, index=False)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monotone_and_random_temperatures(tmp_path):
    metas = make_train_set(tmp_path / "train", FREQUENCIES)
    rng = np.random.default_rng(0)
    random_tau = {t: float(rng.uniform(0.01, 1)) for m in metas for t in m["text_index"]}
    # Image tau: a strictly increasing function of frequency. Text tau: random.
    _write_csv(tmp_path / "temperatures.csv", metas, lambda m: 0.01 + math.sqrt(m["concept_frequency"]),
               lambda m, t: random_tau[t])
    summary = analyze_temperatures(tmp_path / "temperatures.csv", tmp_path / "train", tmp_path / "out")

    corr = summary["concept_frequency"]
    assert corr["image"]["spearman"] == pytest.approx(1.0)
    assert corr["image"]["spearman_per_concept"] == pytest.approx(1.0)
    # The random side against pandas' own Spearman (its Cython rank correlation), per sample.
    text = pd.DataFrame([(m["concept_frequency"], random_tau[t]) for m in metas for t in m["text_index"]])
    assert corr["text"]["spearman"] == pytest.approx(text.corr(method="spearman").iloc[0, 1])
    assert abs(corr["text"]["spearman"]) < 0.9
    assert corr["image"]["num_concepts"] == corr["text"]["num_concepts"] == 5

    dist = summary["distribution"]
    assert dist["image"]["count"] == len(metas) and dist["text"]["count"] == len(random_tau)
    assert dist["text"]["max"] == pytest.approx(max(random_tau.values()))
    assert dist["image"]["min"] == pytest.approx(0.01 + math.sqrt(0.05))

    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert _is_png(out / "tau_histogram.png") and _is_png(out / "tau_vs_frequency.png")
    per_concept = pd.read_csv(out / "per_concept.csv")
    assert per_concept["concept"].tolist()[0] == "circle"  # most frequent first
    star = per_concept.set_index("concept").loc["star"]
    star_texts = [random_tau[t] for m in metas if m["concept"] == "star" for t in m["text_index"]]
    assert star["tau_text_mean"] == pytest.approx(np.mean(star_texts))
    assert star["num_text"] == len(star_texts) and star["num_image"] == 2
    assert star["tau_image_mean"] == pytest.approx(0.01 + math.sqrt(0.1))


def test_without_concepts_only_the_distribution(tmp_path):
    make_retrieval_set(tmp_path / "plain", num_images=3)  # its samples record no concept
    pd.DataFrame({"side": ["image", "image", "text"], "index": [0, 1, 0], "tau": [0.1, 0.3, 0.2]}).to_csv(
        tmp_path / "t.csv", index=False)
    for train in (tmp_path / "plain", None):
        summary = analyze_temperatures(tmp_path / "t.csv", train, tmp_path / "out")
        assert summary["concept_frequency"] is None
        assert summary["distribution"]["image"]["mean"] == pytest.approx(0.2)
        assert not (tmp_path / "out" / "tau_vs_frequency.png").exists()


def test_constant_temperatures_have_no_correlation(tmp_path):
    metas = make_train_set(tmp_path / "train", FREQUENCIES)
    tau = 0.05  # means of 3, 6, 12, ... copies of 0.05 are not exactly 0.05
    _write_csv(tmp_path / "t.csv", metas, lambda m: tau, lambda m, t: tau)
    corr = analyze_temperatures(tmp_path / "t.csv", tmp_path / "train", tmp_path / "out")["concept_frequency"]
    for side in ("image", "text"):
        assert corr[side]["spearman"] is None and corr[side]["spearman_per_concept"] is None


def test_spearman_of_ties_and_constants():
    x = pd.Series([1, 2, 2, 3])
    assert spearman(x, pd.Series([10.0, 20.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(x, pd.Series([3.0, 2.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert spearman(x, pd.Series([1.0, 1.0, 1.0, 1.0])) is None


@pytest.mark.parametrize("text, message", [
    ("side,index\nimage,0\n", "missing column 'tau'"),
    ("side,index,tau\nimage,0,0.1\nvideo,1,0.2\n", "line 3: side 'video'"),
    ("side,index,tau\nimage,-1,0.1\n", "line 2: index"),
    ("side,index,tau\nimage,0,0.1\ntext,0,nan\n", "line 3: tau"),
    ("side,index,tau\nimage,0,0\n", "line 2: tau"),
])
def test_bad_temperature_files(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(TemperatureError, match=message):
        read_temperatures(tmp_path / "t.csv")


def test_indices_outside_the_training_set(tmp_path):
    metas = make_train_set(tmp_path / "train", {"a": 0.5, "b": 0.5})
    _write_csv(tmp_path / "t.csv", metas + [{"image_index": 999, "text_index": []}], lambda m: 0.1, lambda m, t: 0.1)
    with pytest.raises(TemperatureError, match=r"1 image indices \(e.g. 999\) are not in training set"):
        analyze_temperatures(tmp_path / "t.csv", tmp_path / "train", tmp_path / "out")
