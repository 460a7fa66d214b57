"""prep coco (Karpathy JSON, train and val layouts) and prep wds (img2dataset-style re-sharding)."""
from __future__ import annotations

import json

import pytest

from clip_dro.errors import UserError
from data_prep.coco import prep_coco
from data_prep.reshard import prep_wds
from data_prep.tabular import prep_table
from datagen import (caption, id_of_image, image_bytes, parse_caption, read_dataset, write_images,
                     write_wds_input)


def test_coco_train_records_are_grouped_per_image(tmp_path):
    names = write_images(tmp_path / "images", range(4))
    records = [{"image": names[i % 4], "caption": caption(i % 4, i // 4), "image_id": f"coco_{i % 4}"}
               for i in range(10)]
    records.insert(3, {"image": names[1], "caption": " ", "image_id": "coco_1"})  # row 3: empty caption
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(records))
    manifest = prep_coco(annotations=ann, image_root=tmp_path / "images", output=tmp_path / "out", shard_size=3,
                         workers=2, shuffle=False)
    samples = read_dataset(tmp_path / "out")
    assert manifest.num_images == 4 and manifest.num_texts == 10 and manifest.rejected == 1
    assert manifest.accepted + manifest.rejected == 11 == manifest.source["rows"]
    for i, s in enumerate(samples):
        assert id_of_image(s["image"]) == i and s["meta"]["image_id"] == f"coco_{i}"
        assert [parse_caption(c) for c in s["captions"]] == [(i, j) for j in range(len(s["captions"]))]
    assert [len(s["captions"]) for s in samples] == [3, 3, 2, 2]
    rejected = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert rejected["row"] == 3 and rejected["record"] == 3 and rejected["reason"] == "empty caption"


def test_coco_val_records_carry_caption_lists(tmp_path):
    names = write_images(tmp_path / "images", range(3))
    records = [{"image": names[i], "caption": [caption(i, j) for j in range(5)]} for i in range(3)]
    records[1]["caption"][2] = ""
    records.append({"image": "gone.jpg", "caption": ["x", "y"]})
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(records))
    manifest = prep_coco(annotations=ann, image_root=tmp_path / "images", output=tmp_path / "out", workers=1,
                         shuffle=False)
    samples = read_dataset(tmp_path / "out")
    assert [len(s["captions"]) for s in samples] == [5, 4, 5] and manifest.num_texts == 14
    assert [s["meta"]["text_index"][0] for s in samples] == [0, 5, 9]
    assert manifest.rejected == 3 and manifest.accepted == 14
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert reasons[0] == "empty caption" and all(r.startswith("missing file") for r in reasons[1:])


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ('{"a": 1}', "list of records"),
                                              ('[{"image": "a.jpg"}]', "record 0"),
                                              ('[{"image": "a.jpg", "caption": 3}]', "record 0")])
def test_coco_bad_annotations(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text(content)
    with pytest.raises(UserError, match=message):
        prep_coco(annotations=ann, image_root=tmp_path / "images", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _img2dataset_shards(tmp_path):
    def sample(key, image_id, text=None, image=True, meta=True):
        return {"__key__": key, "jpg": image_bytes(image_id) if image is True else image,
                "txt": (text if text is not None else caption(image_id, 0)).encode(),
                "json": json.dumps({"key": key, "url": f"http://x/{image_id}", "status": "success"}).encode()
                if meta else None}
    write_wds_input(tmp_path / "00000.tar", [sample("000000000", 0), sample("000000001", 1, image=None),
                                             sample("000000002", 2), sample("000000003", 3, text="  ")])
    write_wds_input(tmp_path / "00001.tar", [sample("000010000", 4, image=image_bytes(4)[:50]),
                                             sample("000010001", 5, meta=False), sample("000010002", 6)])


def test_wds_reshard_drops_and_records_bad_samples(tmp_path):
    _img2dataset_shards(tmp_path)
    manifest = prep_wds(input=str(tmp_path / "{00000..00001}.tar"), output=tmp_path / "out", shard_size=2,
                        image_size=8, workers=2, shuffle=False)
    samples = read_dataset(tmp_path / "out")
    assert [id_of_image(s["image"]) for s in samples] == [0, 2, 5, 6]
    assert [s["meta"]["index"] for s in samples] == [0, 1, 2, 3] == [s["meta"]["text_index"][0] for s in samples]
    assert [parse_caption(s["captions"][0])[0] for s in samples] == [0, 2, 5, 6]
    assert samples[0]["meta"]["url"] == "http://x/0" and samples[0]["meta"]["source_key"] == "000000000"
    assert samples[2]["meta"]["source_shard"] == "00001.tar" and "url" not in samples[2]["meta"]
    assert {s["image"].size for s in samples} == {(12, 8)}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], r["key"]) for r in rejected] == [(1, "000000001"), (3, "000000003"), (4, "000010000")]
    assert rejected[0]["reason"] == "missing image" and rejected[1]["reason"] == "empty caption"
    assert rejected[2]["reason"].startswith("undecodable image")
    assert manifest.accepted + manifest.rejected == 7 == manifest.source["rows"]


def test_wds_reshards_a_prep_output_with_all_captions(tmp_path):
    names = write_images(tmp_path / "images", range(5))
    records = [{"image": names[i], "caption": [caption(i, j) for j in range(i % 3 + 1)]} for i in range(5)]
    (tmp_path / "val.json").write_text(json.dumps(records))
    prep_coco(annotations=tmp_path / "val.json", image_root=tmp_path / "images", output=tmp_path / "a", shard_size=2,
              shuffle=False)
    shards = sorted(str(p) for p in (tmp_path / "a").glob("*.tar"))
    manifest = prep_wds(input=shards, output=tmp_path / "b", shard_size=4, workers=1, shuffle=False)
    a, b = read_dataset(tmp_path / "a"), read_dataset(tmp_path / "b")
    assert manifest.num_texts == sum(i % 3 + 1 for i in range(5)) and len(manifest.shards) == 2
    assert [s["captions"] for s in a] == [s["captions"] for s in b]
    assert [s["meta"]["text_index"] for s in a] == [s["meta"]["text_index"] for s in b]
    assert b[3]["meta"]["image"] == names[3]  # source fields kept


def test_wds_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prep_wds(input=str(tmp_path / "{0..1}.tar"), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "0.tar").write_bytes(b"\x00garbage" * 100)  # damaged input: a rejected row, not the end
    manifest = prep_wds(input=str(tmp_path / "0.tar"), output=tmp_path / "out", workers=1)
    (rejected,) = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected["shard"] == str(tmp_path / "0.tar") and rejected["reason"].startswith("damaged input shard")
    assert (manifest.num_samples, manifest.accepted, manifest.rejected) == (0, 0, 1)


@pytest.mark.parametrize("source", ["csv", "coco", "wds"])
def test_rows_are_shuffled_by_seed_and_recorded(tmp_path, source):
    """Input in class order comes out in a seeded random order; --no-shuffle keeps it."""
    names = write_images(tmp_path / "images", range(24))

    def run(out, **kw):
        if source == "csv":
            import pandas as pd

            pd.DataFrame({"p": [names[i] for i in range(24)], "c": [caption(i, 0) for i in range(24)]}).to_csv(
                tmp_path / "t.csv", index=False)
            return prep_table(input=tmp_path / "t.csv", output=tmp_path / out, image_col="p", caption_col="c",
                              image_root=tmp_path / "images", shard_size=5, workers=1, **kw)
        if source == "coco":
            (tmp_path / "a.json").write_text(json.dumps([{"image": names[i], "caption": caption(i, 0)}
                                                         for i in range(24)]))
            return prep_coco(annotations=tmp_path / "a.json", image_root=tmp_path / "images", output=tmp_path / out,
                             shard_size=5, workers=1, **kw)
        for shard in range(4):
            write_wds_input(tmp_path / f"{shard}.tar", [{"__key__": f"{i:04d}", "jpg": image_bytes(i),
                                                          "txt": caption(i, 0).encode()}
                                                         for i in range(6 * shard, 6 * shard + 6)])
        return prep_wds(input=str(tmp_path / "{0..3}.tar"), output=tmp_path / out, shard_size=5, workers=1, **kw)

    def order(out):
        return [parse_caption(s["captions"][0])[0] for s in read_dataset(tmp_path / out)]

    manifest, kept = run("a", seed=1), run("d", shuffle=False)
    run("b", seed=1)
    run("c", seed=2)
    assert manifest.source["shuffle"] is True and manifest.source["seed"] == 1 and kept.source["shuffle"] is False
    assert sorted(order("a")) == list(range(24)) == order("d")
    assert order("a") == order("b") != order("c")
    assert order("a") != list(range(24))
    assert [id_of_image(s["image"]) for s in read_dataset(tmp_path / "a")] == order("a")  # pairs kept together
    assert [s["meta"]["index"] for s in read_dataset(tmp_path / "a")] == list(range(24))
