"""The built-in synthetic dataset: web-like long-tailed counts, recorded frequencies, small held-out eval sets
over head, body and tail, captions naming their concept, determinism."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clip_dro.errors import UserError
from clip_dro.manifest import load_manifest
from data_prep import shapes
from data_prep.synthetic import (EVAL_CONCEPTS, concept_counts, eval_concepts, prep_synthetic, ranked_concepts,
                                 zipf_mandelbrot_counts)
from datagen import read_dataset

NUM_TRAIN = 320
WEB_SCALE = 4000  # the quickstart's num_train, where design.md §3.4's frequency claims are checked


@pytest.fixture(scope="module")
def synthetic(module_tmp) -> Path:
    out = module_tmp("syn") / "data"
    prep_synthetic(output=out, num_train=NUM_TRAIN, seed=3, workers=2)
    return out


def assert_caption_names_concept(caption: str, meta: dict) -> None:
    words = caption.rstrip(".").replace(",", "").replace(":", "").split()
    named = [w for w in words if w in shapes.COLOURS]
    assert named == list(meta["colours"]) and meta["shape"] in words, (caption, meta)


def test_concept_space_is_large_and_named_by_its_attributes():
    concepts = shapes.concepts()
    assert len(concepts) == len(shapes.SHAPES) * (8 + 28) == 360
    names = shapes.concept_names()
    assert len(set(names)) == 360 and names[0] == "red circle" and "red and blue circle" in names
    assert all(1 <= len(c.colours) <= 2 and len(set(c.colours)) == len(c.colours) for c in concepts)


def test_zipf_mandelbrot_counts_match_shares():
    counts = zipf_mandelbrot_counts(4000, 360, exponent=1.0, offset=8.0)
    weights = 1 / (np.arange(1, 361) + 8.0)
    assert sum(counts) == 4000 and np.all(np.abs(np.array(counts) - 4000 * weights / weights.sum()) < 1)
    assert counts == sorted(counts, reverse=True)


def test_frequencies_are_web_like_at_quickstart_scale():
    counts = np.array(sorted(concept_counts(WEB_SCALE).values(), reverse=True))
    assert counts.sum() == WEB_SCALE and len(counts) == 360
    assert counts[0] <= 0.03 * WEB_SCALE  # the head concept: under 4 of a 128-sample batch
    assert counts[:10].sum() <= 0.25 * WEB_SCALE
    assert (counts <= 5).sum() >= 150  # a long tail of concepts with a handful of images
    assert counts[0] >= 30 * counts[-1] > 0


def test_ranks_and_eval_concepts_do_not_depend_on_num_train():
    small, large = concept_counts(NUM_TRAIN), concept_counts(WEB_SCALE)
    head = ranked_concepts()[0].name
    assert small[head] == max(small.values()) and large[head] == max(large.values())
    evaluated = eval_concepts()
    assert len(evaluated) == EVAL_CONCEPTS == len(set(evaluated))
    ranks = sorted(ranked_concepts().index(c) for c in evaluated)
    assert ranks[0] == 0 and ranks[-1] == 359 and max(np.diff(ranks)) <= 6  # spread over head, body and tail
    assert sum(large[c.name] <= 5 for c in evaluated) >= 16


def test_train_is_long_tailed_and_records_frequencies(synthetic):
    manifest = load_manifest(synthetic / "train", expected_kind="train")
    samples = read_dataset(synthetic / "train")
    assert manifest.num_samples == NUM_TRAIN == len(samples) and manifest.num_texts == NUM_TRAIN
    assert manifest.extra["generator"] == "shapes-v2" and manifest.extra["zipf_offset"] == 8.0
    observed = Counter(s["meta"]["concept"] for s in samples)
    recorded = dict(zip(manifest.extra["concepts"], manifest.extra["concept_counts"]))
    assert len(recorded) == 360 and {c: n for c, n in recorded.items() if n} == dict(observed)
    assert max(observed.values()) >= 5 * min(observed.values())
    for s in samples:
        meta = s["meta"]
        assert meta["concept_count"] == observed[meta["concept"]]
        assert meta["concept_frequency"] == pytest.approx(observed[meta["concept"]] / NUM_TRAIN)
        assert meta["concept"] == shapes.Concept(meta["shape"], tuple(meta["colours"])).name
        assert_caption_names_concept(s["captions"][0], meta)
        assert s["image"].size == (64, 64)
    # enough shards for several lanes
    assert len(manifest.shards) >= 16


def test_image_shows_every_named_colour(synthetic):
    samples = read_dataset(synthetic / "train")[:60]
    assert any(len(s["meta"]["colours"]) == 2 for s in samples)
    for s in samples:
        pixels = np.asarray(s["image"].convert("RGB"), dtype=float).reshape(-1, 3)
        for colour in s["meta"]["colours"]:
            near = np.linalg.norm(pixels - np.array(shapes.COLOURS[colour], dtype=float), axis=1) < 40
            assert near.sum() >= 15, (colour, s["meta"])  # each colour's half of the shape carries it


def test_retrieval_set_is_balanced_and_distinguishable(synthetic):
    manifest = load_manifest(synthetic / "retrieval", expected_kind="retrieval")
    samples = read_dataset(synthetic / "retrieval")
    assert manifest.num_images == 512 == len(samples) and manifest.num_texts == 5 * 512
    assert all(len(s["captions"]) == 5 == len(set(s["captions"])) for s in samples)
    per_concept = Counter(s["meta"]["concept"] for s in samples)
    assert set(per_concept) == {c.name for c in eval_concepts()} and set(per_concept.values()) == {8}
    described = {(s["meta"]["concept"], s["meta"]["size"], s["meta"]["position"]) for s in samples}
    assert len(described) == 512
    for s in samples:
        for text in s["captions"]:
            assert_caption_names_concept(text, s["meta"])


def test_zeroshot_set_labels_cover_exactly_its_classnames(synthetic):
    directory = synthetic / "zeroshot"
    manifest = load_manifest(directory, expected_kind="zeroshot")
    classnames = (directory / "classnames.txt").read_text().splitlines()
    templates = (directory / "templates.txt").read_text().splitlines()
    assert classnames == [c.name for c in eval_concepts()] and all("{c}" in t for t in templates)
    assert "a photo of a {c}." in templates and "a drawing of a {c}." in templates
    samples = read_dataset(directory)
    assert manifest.num_samples == 640 == len(samples)
    labels = Counter(int(s["files"]["cls"]) for s in samples)
    assert set(labels) == set(range(len(classnames))) and set(labels.values()) == {10}
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
    # Another seed draws other images of the same concepts, as often: ranks do not depend on the seed.
    assert Counter(s["meta"]["concept"] for s in read_dataset(tmp_path / "other" / "train")) == Counter(
        s["meta"]["concept"] for s in read_dataset(synthetic / "train"))
    classnames = "zeroshot/classnames.txt"
    assert (tmp_path / "other" / classnames).read_text() == (synthetic / classnames).read_text()


def test_rerun_is_already_prepared_and_bad_options_refused(synthetic, capsys, tmp_path):
    prep_synthetic(output=synthetic, num_train=NUM_TRAIN, seed=3, workers=1)
    assert capsys.readouterr().out.count("already prepared") == 3
    with pytest.raises(UserError, match="another dataset"):
        prep_synthetic(output=synthetic, num_train=NUM_TRAIN, seed=5, workers=1)
    with pytest.raises(UserError, match="--num-train"):
        prep_synthetic(output=tmp_path / "x", num_train=0, seed=0)
