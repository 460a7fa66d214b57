"""prep csv (and the shared writer): grouping, pairing, indices, manifest, rejected rows, determinism, resize,
atomicity and the output-directory policy."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clip_dro.errors import UserError
from clip_dro.manifest import load_manifest
from data_prep.images import load_bytes
from data_prep.tabular import prep_table
from data_prep.writer import Candidate, write_dataset
from datagen import captions_table, id_of_image, image_bytes, parse_caption, read_dataset, write_images


def prep(csv: Path, out: Path, root: Path, **kw):
    options = dict(image_col="filepath", caption_col="title", image_root=root, shard_size=3, workers=1, shuffle=False)
    options.update(kw)
    return prep_table(input=csv, output=out, **options)


def test_round_trip_groups_rows_and_keeps_pairs(tmp_path):
    csv, root = captions_table(tmp_path, 7, lambda i: 1 + i % 3)
    manifest = prep(csv, tmp_path / "out", root)
    samples = read_dataset(tmp_path / "out")
    assert manifest.num_samples == manifest.num_images == 7 == len(samples)
    assert manifest.num_texts == sum(1 + i % 3 for i in range(7)) == manifest.accepted
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert [s.first_index for s in manifest.shards] == [0, 3, 6]
    next_text = 0
    for i, s in enumerate(samples):  # images in first-appearance order: id i is sample i
        meta = s["meta"]
        assert s["key"] == f"{i:09d}" and meta["index"] == meta["image_index"] == i
        assert meta["text_index"] == list(range(next_text, next_text + len(s["captions"])))
        next_text += len(s["captions"])
        assert id_of_image(s["image"]) == i
        assert [parse_caption(c) for c in s["captions"]] == [(i, j) for j in range(1 + i % 3)]
        assert meta["image"] == f"img_{i:03d}.jpg" and (meta["width"], meta["height"]) == (24, 16)
    assert (tmp_path / "out" / "rejected.jsonl").read_text() == ""
    assert manifest.source["rows"] == len(pd.read_csv(csv)) and manifest.kind == "train"


@pytest.mark.parametrize("ext", [".tsv", ".parquet", ".jsonl"])
def test_other_table_formats_give_the_same_shards(tmp_path, ext):
    csv, root = captions_table(tmp_path, 4, 2)
    table = pd.read_csv(csv)
    other = tmp_path / f"table{ext}"
    {".tsv": lambda: table.to_csv(other, sep="\t", index=False), ".parquet": lambda: table.to_parquet(other),
     ".jsonl": lambda: table.to_json(other, orient="records", lines=True)}[ext]()
    prep(csv, tmp_path / "a", root)
    prep(other, tmp_path / "b", root)
    names = [s["name"] for s in json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"]]
    assert len(names) == 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_rows_are_rejected_and_counted(tmp_path):
    root = tmp_path / "images"
    write_images(root, range(3))
    (root / "corrupt.jpg").write_bytes(image_bytes(0)[:40])  # truncated JPEG
    rows = [("img_000.jpg", "item 0 caption 0"), ("missing.jpg", "item 9 caption 0"), ("img_001.jpg", "  "),
            ("corrupt.jpg", "item 8 caption 0"), ("img_001.jpg", "item 1 caption 1"), ("", "no image"),
            ("img_002.jpg", "item 2\ncaption 0"), ("corrupt.jpg", "item 8 caption 1")]
    csv = tmp_path / "t.csv"
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(csv, index=False)
    manifest = prep(csv, tmp_path / "out", root)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["row"]: r["reason"] for r in rejected}
    assert sorted(reasons) == [1, 2, 3, 5, 7]
    assert reasons[1].startswith("missing file") and reasons[2] == "empty caption"
    assert reasons[3].startswith("undecodable image") and reasons[7].startswith("undecodable image")
    assert reasons[5] == "missing image path"
    assert manifest.accepted == 3 and manifest.rejected == 5 and manifest.accepted + manifest.rejected == len(rows)
    samples = read_dataset(tmp_path / "out")
    assert [s["captions"] for s in samples] == [["item 0 caption 0"], ["item 1 caption 1"], ["item 2 caption 0"]]
    assert [id_of_image(s["image"]) for s in samples] == [0, 1, 2]
    assert [s["meta"]["text_index"] for s in samples] == [[0], [1], [2]]


def test_bad_input_is_a_user_error_naming_it(tmp_path):
    csv, root = captions_table(tmp_path, 2, 1)
    with pytest.raises(UserError, match="'caption'"):
        prep(csv, tmp_path / "o1", root, caption_col="caption")
    garbage = tmp_path / "t.parquet"
    garbage.write_bytes(b"not a parquet file")
    with pytest.raises(UserError, match="t.parquet"):
        prep(garbage, tmp_path / "o2", root)
    with pytest.raises(UserError, match="unknown table format"):
        prep(tmp_path / "t.xlsx", tmp_path / "o3", root)
    with pytest.raises(UserError, match="no such file"):
        prep(tmp_path / "nope.csv", tmp_path / "o4", root)
    with pytest.raises(UserError, match="--image-root"):
        prep(csv, tmp_path / "o5", tmp_path / "nowhere")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_rerun_and_output_directory_policy(tmp_path, capsys):
    csv, root = captions_table(tmp_path, 4, 1)
    out = tmp_path / "out"
    prep(csv, out, root)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prep(csv, out, root)
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    with pytest.raises(UserError, match="another dataset"):
        prep(csv, out, root, shard_size=2)  # same table, other options: another dataset
    (out / "manifest.json").unlink()  # looks like an interrupted run
    with pytest.raises(UserError, match="no manifest.json"):
        prep(csv, out, root)


def test_failure_leaves_no_output(tmp_path):
    def items():
        for i in range(5):
            yield Candidate(rows=[{"row": i}], captions=["x"], load=load_bytes, arg=image_bytes(i))
        raise UserError("boom")

    with pytest.raises(UserError, match="boom"):
        write_dataset(tmp_path / "out", {"kind": "test"}, items(), shard_size=2, image_size=None, workers=1)
    assert not (tmp_path / "out").exists()


def test_deterministic_across_runs_and_workers(tmp_path):
    csv, root = captions_table(tmp_path, 40, 2)
    prep(csv, tmp_path / "a", root, workers=1, shard_size=7)
    prep(csv, tmp_path / "b", root, workers=2, shard_size=7)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 6 + 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_resize_shrinks_the_shorter_side_only(tmp_path):
    csv, root = captions_table(tmp_path, 3, 1, size=(40, 20))
    prep(csv, tmp_path / "small", root, image_size=10)
    prep(csv, tmp_path / "same", root, image_size=64)
    small, same = read_dataset(tmp_path / "small"), read_dataset(tmp_path / "same")
    assert {s["image"].size for s in small} == {(20, 10)} and {s["image"].size for s in same} == {(40, 20)}
    assert [id_of_image(s["image"]) for s in small] == [0, 1, 2]
    # unchanged images keep their original bytes
    assert same[1]["files"]["jpg"] == (root / "img_001.jpg").read_bytes()


def test_png_keeps_its_format(tmp_path):
    root = tmp_path / "images"
    names = write_images(root, range(2), fmt="PNG")
    csv = tmp_path / "t.csv"
    pd.DataFrame([(names[0], "a"), (names[1], "b")], columns=["filepath", "title"]).to_csv(csv, index=False)
    manifest = prep(csv, tmp_path / "out", root)
    samples = read_dataset(tmp_path / "out")
    assert [s["ext"] for s in samples] == ["png", "png"] and manifest.rejected == 0
    assert load_manifest(tmp_path / "out").num_texts == 2


def test_rejected_rows_keep_unusual_line_separators(tmp_path):
    """A rejected row's caption may hold U+2028 or U+0085 (line separators to str.splitlines): rejected.jsonl
    still has one JSON line per rejected row."""
    csv, root = captions_table(tmp_path, 3, 1)
    rows = pd.read_csv(csv).values.tolist() + [["missing.jpg", "first\u2028second\x85third"], ["gone.jpg", "x"]]
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(csv, index=False)
    manifest = prep(csv, tmp_path / "out", root)
    lines = (tmp_path / "out" / "rejected.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    assert manifest.rejected == 2 == len(lines)
    assert json.loads(lines[0])["caption"] == "first\u2028second\x85third"
