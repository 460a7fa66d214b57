"""``clip-dro prep tuxpaint`` on a generated stand-in with the layout of Debian's tuxpaint-stamps-default
(category folders, nested sub-folders, PNGs with alpha, SVGs, .txt descriptions with translations, mirror
variants, a stamp without .txt), and on the real package where it is installed."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.tuxpaint import CATEGORY_CAPTIONS, DEFAULT_STAMPS, TEMPLATES, available_renderer, prep_tuxpaint
from data_prep.writer import PrepError

COLOURS = {"animals": (200, 30, 30), "food": (30, 160, 30), "naturalforces": (30, 30, 200)}
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
       '<rect x="10" y="5" width="20" height="10" fill="#1e1ec8"/></svg>')


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    """A 32 x 32 stamp: an opaque square in the middle, the rest fully transparent."""
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 8:24] = (*colour, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)


def make_stamps(root: Path) -> Path:
    """5 stamps per category (two nested), one SVG-only stamp, one stamp with both PNG and SVG, a mirror
    variant, a stamp without .txt and one with an empty first line."""
    for category, colour in COLOURS.items():
        for i in range(5):
            sub = root / category / ("sub" if i % 2 else "") / f"{category}{i}"
            _png(sub.with_suffix(".png"), colour)
            sub.with_suffix(".txt").write_text(f"A {category} thing number {i}.\nfr.utf8=Une chose {i}.\n")
    _png(root / "animals/sub/animals1_mirror.png", (0, 0, 0))
    (root / "food/apple.svg").write_text(SVG)
    (root / "food/apple.txt").write_text("An apple.\nde.utf8=Ein Apfel.\n")
    _png(root / "food/pear.png", COLOURS["food"])
    (root / "food/pear.svg").write_text(SVG)
    (root / "food/pear.txt").write_text("A pear.\n")
    _png(root / "animals/tux.png", (0, 0, 0))  # no .txt
    _png(root / "animals/blank.png", (0, 0, 0))
    (root / "animals/blank.txt").write_text("\nfr.utf8=rien\n")
    (root / "animals/sound.ogg").write_bytes(b"OggS")
    return root


def read_samples(directory: Path) -> list[dict]:
    samples = []
    for shard in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, files in sorted(members.items()):
            image_ext = next(e for e in files if e in ("png", "jpg", "webp"))
            samples.append({"json": json.loads(files["json"]), "txt": files["txt"].decode(),
                            "cls": files.get("cls"), "image": Image.open(io.BytesIO(files[image_ext]))})
    return samples


@pytest.fixture(scope="module")
def stamps(module_tmp) -> Path:
    return make_stamps(module_tmp("stamps"))


def test_splits_labels_and_counts_without_svg_renderer(stamps, tmp_path):
    manifests = prep_tuxpaint(tmp_path / "out", stamps, held_out_fraction=0.4, seed=1, workers=1,
                              svg_renderer="none")
    train, retrieval, zeroshot = (read_samples(tmp_path / "out" / s) for s in ("train", "retrieval", "zeroshot"))
    extra = manifests["train"].extra
    # 19 stamps: 15 + apple (SVG only, left out) + pear (PNG used) + tux (no .txt) + blank; the mirror is a variant.
    assert extra["stamps"] == 19 and extra["svg_left_out"] == 1 and extra["without_description"] == 2
    assert extra["variants_skipped"] == 1 and extra["png_used"] == 16 and extra["svg_used"] == 0
    rejected = [json.loads(x) for x in (tmp_path / "out/train/rejected.jsonl").read_text().splitlines()]
    assert sorted((r["stamp"], r["reason"].split(" (")[0]) for r in rejected) == [
        ("animals/blank", "empty description"), ("animals/tux", "no description"),
        ("food/apple", "SVG stamp and no SVG renderer at hand")]
    m = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert m["accepted"] + m["rejected"] == m["source"]["rows"] and m["rejected"] == 3

    # Per category round(0.4 x 5) = 2 held out (food has 6 usable: round(2.4) = 2).
    held = sorted(s["json"]["stamp"] for s in retrieval)
    assert held == sorted(s["json"]["stamp"] for s in zeroshot) and len(held) == 6
    assert not set(held) & {s["json"]["stamp"] for s in train} and len(train) + len(held) == 16
    classnames = (tmp_path / "out/zeroshot/classnames.txt").read_text().splitlines()
    assert classnames == ["animals", "food", "natural forces"]
    assert (tmp_path / "out/zeroshot/templates.txt").read_text().splitlines() == list(TEMPLATES)
    for s in zeroshot:
        assert classnames[int(s["cls"])] == s["json"]["category"].replace("naturalforces", "natural forces")
        assert s["json"]["stamp"].startswith(s["json"]["category"] + "/")
    # The English first line only; the translations are not captions.
    by_stamp = {s["json"]["stamp"]: s for s in train + retrieval}
    assert by_stamp["food/pear"]["txt"].strip() == "A pear." and by_stamp["food/pear"]["json"]["format"] == "png"
    assert all("utf8" not in s["txt"] for s in by_stamp.values())
    # Concept frequency = the category's share of the training stamps.
    counts = {c: sum(s["json"]["category"] == c for s in train) for c in COLOURS}
    for s in train + retrieval:
        assert s["json"]["concept"] == s["json"]["category"]
        assert s["json"]["concept_frequency"] == pytest.approx(counts[s["json"]["category"]] / len(train))
    # Transparency composited on white: a corner is white, the middle keeps its colour.
    image = np.asarray(by_stamp["animals/animals0"]["image"].convert("RGB"))
    assert tuple(image[0, 0]) == (255, 255, 255) and tuple(image[16, 16]) == COLOURS["animals"]


def test_split_is_seeded_and_output_deterministic(stamps, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        prep_tuxpaint(tmp_path / name, stamps, held_out_fraction=0.4, seed=seed, workers=1, svg_renderer="none")
    for split in ("train", "retrieval", "zeroshot"):
        files = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "b" / split).iterdir())
        for name in files:
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    held = {name: {s["json"]["stamp"] for s in read_samples(tmp_path / name / "retrieval")} for name in "ac"}
    assert held["a"] != held["c"] and len(held["a"]) == len(held["c"])


def test_category_captions_replace_the_training_descriptions_only(stamps, tmp_path):
    """The duplicate-heavy variant: the same stamps, images and held-out sets; training captions are the
    category in a seeded template."""
    runs = {}
    for captions in ("description", "category"):
        prep_tuxpaint(tmp_path / captions, stamps, held_out_fraction=0.4, seed=1, workers=1, svg_renderer="none",
                      train_captions=captions)
        runs[captions] = {split: read_samples(tmp_path / captions / split) for split in ("train", "retrieval")}
    described, categorized = runs["description"], runs["category"]
    assert [s["txt"] for s in described["retrieval"]] == [s["txt"] for s in categorized["retrieval"]]
    assert [s["json"]["stamp"] for s in described["train"]] == [s["json"]["stamp"] for s in categorized["train"]]
    readable = {"animals": "animals", "food": "food", "naturalforces": "natural forces"}
    for sample in categorized["train"]:
        allowed = {t.format(c=readable[sample["json"]["category"]]) for t in CATEGORY_CAPTIONS}
        assert sample["txt"].strip() in allowed, sample["txt"]
    captions = [s["txt"] for s in categorized["train"]]
    assert len(set(captions)) < len(captions) and len({t.split(" of ")[0] for t in captions}) > 1, captions
    source = json.loads((tmp_path / "category/train/manifest.json").read_text())["source"]
    assert source["train_captions"] == "category"
    with pytest.raises(PrepError, match="--train-captions 'titles'"):
        prep_tuxpaint(tmp_path / "bad", stamps, svg_renderer="none", train_captions="titles")


def test_svg_stamps_are_rendered_when_a_renderer_is_at_hand(stamps, tmp_path):
    renderer = available_renderer("auto")
    if renderer is None:
        pytest.skip("no SVG renderer (cairosvg, rsvg-convert) installed")
    manifests = prep_tuxpaint(tmp_path / "out", stamps, held_out_fraction=0.4, seed=1, workers=1)
    assert manifests["train"].extra["svg_used"] == 1 and manifests["train"].extra["svg_renderer"] == renderer
    apple = [s for split in ("train", "retrieval") for s in read_samples(tmp_path / "out" / split)
             if s["json"]["stamp"] == "food/apple"]
    assert len(apple) == 1 and apple[0]["json"]["format"] == "svg" and apple[0]["txt"].strip() == "An apple."
    image = np.asarray(apple[0]["image"].convert("RGB"))
    assert image.shape[:2] == (256, 512)  # 40 x 20 drawn 512 wide
    assert tuple(image[0, 0]) == (255, 255, 255) and tuple(image[128, 256]) == (30, 30, 200)


@pytest.mark.parametrize("kwargs, message", [
    ({"stamps": Path("/nonexistent/stamps")}, "--stamps"),
    ({"held_out_fraction": 1.0}, "--held-out-fraction"),
    ({"image_size": 0}, "image-size"),
])
def test_bad_options_are_one_line_errors(stamps, tmp_path, kwargs, message):
    with pytest.raises(PrepError, match=message):
        prep_tuxpaint(tmp_path / "out", **{"stamps": stamps, **kwargs})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_STAMPS.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_the_real_stamps(tmp_path):
    manifests = prep_tuxpaint(tmp_path / "tux", image_size=64, workers=2)
    extra = manifests["train"].extra
    assert extra["stamps"] > 900 and len(extra["categories"]) >= 16
    assert extra["svg_used"] + extra["svg_left_out"] > 100, "the SVG stamps are used or counted"
    classnames = (tmp_path / "tux/zeroshot/classnames.txt").read_text().splitlines()
    assert len(classnames) == len(extra["categories"])
    assert manifests["retrieval"].num_samples == manifests["zeroshot"].num_samples > 150
