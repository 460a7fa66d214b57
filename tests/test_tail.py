"""The tail analysis (design.md §8.5): caption counts against a brute-force count of a real prep set, the
whole-word rules, the cache, and the buckets and Spearman against independent computations."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from clip_dro.evaluation import tail
from clip_dro.evaluation.tail import (caption_word_frequencies, class_frequencies, compare_models, plot_zeroshot_tail,
                                      retrieval_tail, zeroshot_tail)
from clip_dro.manifest import load_manifest
from data_prep.tabular import prep_table
from datagen import read_dataset, write_images

EDGE_CAPTIONS = [
    ["A cat sat on the mat.", "Category theory, not a cat-egory? cat's toy"],
    ["Cat. Cat cat!", "concatenate CATS"],
    ["the golden retriever and a Golden  Retriever", "golden; retriever", "retriever golden"],
    ["black-and-white colobus", "BLACK and white cat_dog"],
]
VOCAB = ["cat", "dog", "golden", "retriever", "black", "and", "white", "mat", "the", "a", "on", "theory", "red",
         "Cat,", "DOG.", "category"]
CLASSNAMES = ["cat", "dog", "golden retriever", "black and white", "Mat", "zebra", "theory", "CAT", "white cat"]


def _captions(seed: int, num_images: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    generated = [[" ".join(rng.choice(VOCAB, size=rng.integers(1, 7))) for _ in range(rng.integers(1, 4))]
                 for _ in range(num_images - len(EDGE_CAPTIONS))]
    return EDGE_CAPTIONS + generated


def _prep(tmp: Path, name: str, captions: list[list[str]]) -> Path:
    """A real prep output (prep csv) whose image i carries ``captions[i]``."""
    names = write_images(tmp / f"{name}_images", range(len(captions)))
    rows = [(names[i], text) for i, texts in enumerate(captions) for text in texts]
    csv = tmp / f"{name}.csv"
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(csv, index=False)
    prep_table(input=csv, output=tmp / name, image_col="filepath", caption_col="title",
               image_root=tmp / f"{name}_images", shard_size=5, workers=1, shuffle=False)
    return tmp / name


def _brute_force(directory: Path, names: list[str]) -> list[int]:
    """Captions (read back with the standard library's tarfile) that match the name's words with any
    non-word characters between them, not inside a longer word, ignoring case."""
    captions = [c for sample in read_dataset(directory) for c in sample["captions"]]
    patterns = [re.compile(r"(?<!\w)" + r"\W+".join(map(re.escape, name.split())) + r"(?!\w)", re.IGNORECASE)
                for name in names]
    return [sum(1 for c in captions if p.search(c)) for p in patterns]


@pytest.fixture
def train(tmp_path) -> Path:
    return _prep(tmp_path, "train", _captions(0, 23))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLIP_DRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _reader_fails(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the shards were read again")
    monkeypatch.setattr(tail, "shard_samples", fail)


def test_class_counts_match_a_brute_force_count(train, cache):
    counts = class_frequencies(train, CLASSNAMES)
    assert counts.dtype == np.int64
    assert counts.tolist() == _brute_force(train, CLASSNAMES)
    assert counts[CLASSNAMES.index("zebra")] == 0 and counts[0] == counts[CLASSNAMES.index("CAT")]


def test_whole_words_case_and_once_per_caption(tmp_path, cache):
    directory = _prep(tmp_path, "edge", EDGE_CAPTIONS)
    counts = dict(zip(CLASSNAMES, class_frequencies(directory, CLASSNAMES).tolist()))
    # "A cat sat", "cat-egory ... cat's", "Cat. Cat cat!" (once), "BLACK and white cat_dog" is one word cat_dog;
    # "Category", "concatenate" and "CATS" are other words.
    assert counts["cat"] == 3
    # twice in one caption counts once; "golden; retriever" is the phrase too; "retriever golden" is not
    assert counts["golden retriever"] == 2
    assert counts["black and white"] == 2 and counts["white cat"] == 0 and counts["dog"] == 0
    words = caption_word_frequencies(directory)
    assert words["cat"] == 3 and words["category"] == 1 and words["cat_dog"] == 1 and words["golden"] == 3
    assert words["the"] == 2 and "Cat" not in words


def test_cache_is_reused_and_extended_only_when_needed(train, cache, monkeypatch):
    expected = class_frequencies(train, CLASSNAMES)
    cached = json.loads((train / tail.CACHE_NAME).read_text())
    assert cached["dataset_id"] == load_manifest(train).dataset_id
    assert cached["captions"] == load_manifest(train).num_texts
    words = caption_word_frequencies(train)
    with monkeypatch.context() as patch:
        _reader_fails(patch)
        assert class_frequencies(train, CLASSNAMES).tolist() == expected.tolist()
        assert caption_word_frequencies(train) == words
        # one-word names are read from the word counts: no pass either
        assert class_frequencies(train, ["red", "nothing"]).tolist() == _brute_force(train, ["red", "nothing"])
        with pytest.raises(AssertionError, match="read again"):  # a phrase the cache lacks needs a pass
            class_frequencies(train, ["red cat"])
    assert class_frequencies(train, ["red cat"]).tolist() == _brute_force(train, ["red cat"])
    _reader_fails(monkeypatch)
    assert class_frequencies(train, ["red cat", *CLASSNAMES]).tolist() == _brute_force(train, ["red cat", *CLASSNAMES])


def test_a_cache_of_another_dataset_is_recomputed(tmp_path, train, cache):
    class_frequencies(train, CLASSNAMES)
    other = _prep(tmp_path, "other", _captions(1, 17))
    (other / tail.CACHE_NAME).write_bytes((train / tail.CACHE_NAME).read_bytes())
    assert class_frequencies(other, CLASSNAMES).tolist() == _brute_force(other, CLASSNAMES)
    assert json.loads((other / tail.CACHE_NAME).read_text())["dataset_id"] == load_manifest(other).dataset_id


def test_a_url_is_cached_in_the_cache_directory(train, cache, monkeypatch):
    url = f"pipe:cat {train}/{{name}}"
    counts = class_frequencies(url, CLASSNAMES)
    assert counts.tolist() == _brute_force(train, CLASSNAMES)
    assert not (train / tail.CACHE_NAME).exists()
    assert [p.name for p in cache.iterdir()] == [f"caption_counts-{load_manifest(train).dataset_id}.json"]
    _reader_fails(monkeypatch)
    assert class_frequencies(url, CLASSNAMES).tolist() == counts.tolist()


def _terciles(order: list[int]) -> list[list[int]]:
    n = len(order)
    sizes = [n // 3 + (i < n % 3) for i in range(3)]
    return [order[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3)]


def _decade(frequency: int) -> int:
    return 0 if frequency == 0 else int(math.floor(math.log10(frequency))) + 1


def test_zeroshot_buckets_and_spearman_match_an_independent_computation():
    rng = np.random.default_rng(3)
    num_classes = 40
    frequencies = rng.integers(0, 3000, num_classes)
    frequencies[:5] = 0
    labels = rng.integers(0, num_classes - 2, 600)  # the last two classes have no images
    predictions = np.where(rng.random(600) < 0.5, labels, rng.integers(0, num_classes, 600))
    report = zeroshot_tail(labels, predictions, frequencies)
    json.dumps(report)

    frame = pd.DataFrame({"label": labels, "hit": labels == predictions})
    per_class = frame.groupby("label")["hit"].mean() * 100
    assert report["per_class"]["class"] == per_class.index.tolist()
    assert np.allclose(report["per_class"]["accuracy"], per_class.to_numpy())
    assert report["classes_without_images"] == 2
    order = sorted(per_class.index, key=lambda c: (-frequencies[c], c))
    for name, part in zip(("head", "torso", "tail"), _terciles(order)):
        bucket = report["terciles"][name]
        assert bucket["count"] == len(part)
        assert bucket["accuracy"] == pytest.approx(per_class[part].mean())
        assert bucket["acc1"] == pytest.approx(100 * frame[frame.label.isin(part)].hit.mean())
        assert (bucket["frequency_min"], bucket["frequency_max"]) == (min(frequencies[part]), max(frequencies[part]))
    assert [b["bin"] for b in report["bins"]] == ["0", "1-9", "10-99", "100-999", "1000-9999"]
    for k, b in enumerate(report["bins"]):
        members = [c for c in per_class.index if _decade(frequencies[c]) == k]
        assert b["count"] == len(members)
        assert b["accuracy"] == (pytest.approx(per_class[members].mean()) if members else None)
    expected = spearmanr(per_class.to_numpy(), np.log1p(frequencies[per_class.index])).statistic
    assert report["spearman"] == pytest.approx(expected)


def test_zeroshot_tail_by_hand_and_bad_labels():
    # classes 0..2 with frequencies 50, 0, 5: accuracies 100, 0, 50 percent
    report = zeroshot_tail([0, 0, 1, 2, 2], [0, 0, 2, 2, 1], [50, 0, 5], classnames=["a", "b", "c"])
    assert [report["terciles"][b]["accuracy"] for b in ("head", "torso", "tail")] == [100.0, 50.0, 0.0]
    assert report["per_class"]["name"] == ["a", "b", "c"] and report["spearman"] == pytest.approx(1.0)
    assert [(b["bin"], b["count"]) for b in report["bins"]] == [("0", 1), ("1-9", 1), ("10-99", 1)]
    with pytest.raises(tail.TailError, match="label 3 is outside the 3 classes"):
        zeroshot_tail([3], [0], [1, 2, 3])


def test_retrieval_tail_uses_the_rarest_content_word():
    rng = np.random.default_rng(5)
    vocabulary = [f"w{i}" for i in range(30)] + ["the", "a", "of"]
    word_counts = Counter({f"w{i}": int(rng.integers(0, 5000)) for i in range(25)})  # w25..w29 never seen
    captions = [" ".join(rng.choice(vocabulary, size=rng.integers(1, 6))).upper() + "." for _ in range(300)]
    captions[:2] = ["The a of.", "of THE"]  # no content words
    hits = rng.random(300) < 0.4
    report = retrieval_tail(captions, hits, word_counts)
    json.dumps(report)
    content = [[w for w in re.findall(r"\w+", c.lower()) if w not in {"the", "a", "of"}] for c in captions]
    rarest = {i: min(word_counts[w] for w in ws) for i, ws in enumerate(content) if ws}
    assert report["captions_without_content_words"] == 300 - len(rarest) >= 2 and report["metric"] == "t2i_R@1"
    order = sorted(rarest, key=lambda i: (-rarest[i], i))
    for name, part in zip(("head", "torso", "tail"), _terciles(order)):
        assert report["terciles"][name]["accuracy"] == pytest.approx(100 * hits[part].mean())
        assert report["terciles"][name]["frequency_min"] == min(rarest[i] for i in part)
    assert report["bins"][0]["count"] == sum(1 for f in rarest.values() if f == 0)
    keys = list(rarest)
    expected = spearmanr(hits[keys].astype(float), np.log1p([rarest[i] for i in keys])).statistic
    assert report["spearman"] == pytest.approx(expected)


def _result(model: str, acc1: float, r1: float, head: float, tail_acc: float) -> dict:
    zs_tail = zeroshot_tail([0, 1, 2], [0, 1, 2], [9, 5, 1])
    zs_tail["terciles"]["head"]["accuracy"], zs_tail["terciles"]["tail"]["accuracy"] = head, tail_acc
    return {"model": model, "results": [
        {"task": "zeroshot_classification", "dataset": "zs", "metrics": {"acc1": acc1, "acc5": 90.0},
         "tail": zs_tail},
        {"task": "retrieval", "dataset": "ret", "metrics": {"t2i_R@1": r1, "r_mean": r1 + 1}}]}


def test_plot_and_model_comparison_files(tmp_path):
    rng = np.random.default_rng(0)
    report = zeroshot_tail(rng.integers(0, 12, 200), rng.integers(0, 12, 200), rng.integers(0, 500, 12))
    png = plot_zeroshot_tail(report, tmp_path / "plots" / "tail.png")
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200

    results = {"clip": _result("ViT-B-32", 50.0, 30.0, 70.0, 20.0), "isogclr": _result("ours", 55.0, 33.0, 71.0, 31.0)}
    csv, md, png = compare_models(results, tmp_path / "cmp")
    table = pd.read_csv(csv, index_col="model")
    assert table.index.tolist() == ["clip", "isogclr"]
    assert table.loc["isogclr", "zs/acc1"] == 55.0 and table.loc["clip", "ret/r_mean"] == 31.0
    assert table.loc["clip", "zs/tail:tail"] == 20.0 and table.loc["isogclr", "zs/tail:head"] == 71.0
    assert table.loc["clip", "zs/tail:torso"] == 100.0
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| model | ") and "zs/tail:tail" in lines[0]
    assert len(lines) == 4 and lines[3].startswith("| isogclr | ") and "55.00" in lines[3]
    with Image.open(png) as image:
        assert image.size[0] > 500
