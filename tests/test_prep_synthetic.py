"""The built-in synthetic dataset: long-tailed counts, recorded frequencies, held-out eval sets, determinism."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clip_dro.errors import UserError
from clip_dro.manifest import load_manifest
from data_prep import shapes
from data_prep.synthetic import prep_synthetic, zipf_counts
from datagen import read_dataset

NUM_TRAIN = 320


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    prep_synthetic(output=out, num_train=NUM_TRAIN, seed=3, workers=2)
    return out


def test_zipf_counts_match_shares():
    counts = zipf_counts(4000, 64)
    shares = 4000 * np.array([1 / r for r in range(1, 65)]) / sum(1 / r for r in range(1, 65))
    assert sum(counts) == 4000 and np.all(np.abs(np.array(counts) - shares) < 1)
    assert counts[0] > 800 and counts[-1] < 15


def test_train_is_long_tailed_and_records_frequencies(synthetic):
    manifest = load_manifest(synthetic / "train", expected_kind="train")
    samples = read_dataset(synthetic / "train")
    assert manifest.num_samples == NUM_TRAIN == len(samples) and manifest.num_texts == NUM_TRAIN
    observed = Counter(s["meta"]["concept"] for s in samples)
    assert len(observed) == 64 == len(manifest.extra["concepts"])
    assert dict(zip(manifest.extra["concepts"], manifest.extra["concept_counts"])) == dict(observed)
    assert max(observed.values()) >= 10 * min(observed.values())
    for s in samples:
        meta = s["meta"]
        assert meta["concept_count"] == observed[meta["concept"]]
        assert meta["concept_frequency"] == pytest.approx(observed[meta["concept"]] / NUM_TRAIN)
        assert meta["concept"] == f"{meta['colour']} {meta['shape']}"
        text = s["captions"][0]
        assert meta["colour"] in text and meta["shape"] in text
        assert s["image"].size == (64, 64)
    # enough shards for several lanes
    assert len(manifest.shards) >= 16


def test_image_shows_the_named_colour(synthetic):
    samples = read_dataset(synthetic / "train")[:40]
    for s in samples:
        pixels = np.asarray(s["image"].convert("RGB"), dtype=float).reshape(-1, 3)
        target = np.array(shapes.COLOURS[s["meta"]["colour"]], dtype=float)
        near = np.linalg.norm(pixels - target, axis=1) < 40
        assert near.sum() >= 15, s["meta"]  # the shape's pixels carry its colour


def test_retrieval_set_is_balanced_and_distinguishable(synthetic):
    manifest = load_manifest(synthetic / "retrieval", expected_kind="retrieval")
    samples = read_dataset(synthetic / "retrieval")
    assert manifest.num_images == 512 and manifest.num_texts == 5 * 512
    assert all(len(s["captions"]) == 5 == len(set(s["captions"])) for s in samples)
    assert set(Counter(s["meta"]["concept"] for s in samples).values()) == {8}
    described = {(s["meta"]["concept"], s["meta"]["size"], s["meta"]["position"]) for s in samples}
    assert len(described) == 512


def test_zeroshot_set_labels_follow_classnames(synthetic):
    directory = synthetic / "zeroshot"
    manifest = load_manifest(directory, expected_kind="zeroshot")
    classnames = (directory / "classnames.txt").read_text().splitlines()
    templates = (directory / "templates.txt").read_text().splitlines()
    assert classnames == shapes.concept_names() and all("{c}" in t for t in templates)
    assert "a photo of a {c}." in templates and "a drawing of a {c}." in templates
    samples = read_dataset(directory)
    assert manifest.num_samples == 640 == len(samples)
    for s in samples:
        assert classnames[int(s["files"]["cls"])] == s["meta"]["concept"]


def test_deterministic_for_a_seed(synthetic, tmp_path):
    prep_synthetic(output=tmp_path / "again", num_train=NUM_TRAIN, seed=3, workers=1)
    prep_synthetic(output=tmp_path / "other", num_train=NUM_TRAIN, seed=4, workers=1)
    for split in ("train", "retrieval", "zeroshot"):
        for path in sorted((synthetic / split).iterdir()):
            assert path.read_bytes() == (tmp_path / "again" / split / path.name).read_bytes(), path
    first = json.loads((synthetic / "train" / "manifest.json").read_text())["shards"][0]["name"]
    assert (synthetic / "train" / first).read_bytes() != (tmp_path / "other" / "train" / first).read_bytes()


def test_rerun_is_already_prepared_and_bad_options_refused(synthetic, capsys, tmp_path):
    prep_synthetic(output=synthetic, num_train=NUM_TRAIN, seed=3, workers=1)
    assert capsys.readouterr().out.count("already prepared") == 3
    with pytest.raises(UserError, match="another dataset"):
        prep_synthetic(output=synthetic, num_train=NUM_TRAIN, seed=5, workers=1)
    with pytest.raises(UserError, match="--num-train"):
        prep_synthetic(output=tmp_path / "x", num_train=0, seed=0)
