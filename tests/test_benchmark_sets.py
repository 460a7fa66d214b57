"""Evaluation sets read as researchers hold them: Karpathy JSON (both shapes), CLIP_benchmark's webdataset
layout, CIFAR python archives; each checked against what the files say, read independently."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torchvision

from benchmark_standins import captions_of, picture, write_cifar, write_karpathy_original, write_wds_classification, \
    write_wds_retrieval
from clip_dro.data.benchmark_sets import CIFAR_TEMPLATES, open_retrieval_set, open_zeroshot_set
from clip_dro.data.eval_sets import EvalSetError, decode_image


def _pixels(ref) -> np.ndarray:
    return np.asarray(decode_image(ref))


SPLITS = ["test", "val", "train", "restval", "test", "train", "val", "test"]


@pytest.mark.parametrize("with_filepath", [True, False], ids=["dataset_coco", "dataset_flickr30k"])
@pytest.mark.parametrize("split", ["test", "val", "train"])
def test_karpathy_original_takes_the_asked_split_with_all_captions(tmp_path, with_filepath, split):
    records = write_karpathy_original(tmp_path / "dataset.json", tmp_path / "images", SPLITS, with_filepath)
    info = open_retrieval_set(tmp_path / "dataset.json", tmp_path / "images", split)
    wanted = {"train", "restval"} if split == "train" else {split}
    expected = [r for r in records if r["split"] in wanted]
    assert info.name == f"dataset_{split}"
    assert [ref.path for ref in info.images] == [tmp_path / "images" / r.get("filepath", "") / r["filename"]
                                                 for r in expected]
    assert info.captions == [[s["raw"] for s in r["sentences"]] for r in expected]
    assert all(len(c) == 5 for c in info.captions)
    assert np.array_equal(_pixels(info.images[0]), np.asarray(picture(expected[0]["imgid"])))


def test_albef_per_split_files_merge_the_records_of_an_image(tmp_path):
    write_karpathy_original(tmp_path / "unused.json", tmp_path / "coco", ["test"] * 4)
    names = [f"val2014/img_{i:04d}.png" for i in range(4)]
    test = [{"image": n, "caption": captions_of(i, 5), "image_id": i} for i, n in enumerate(names)]
    train = [{"image": names[i], "caption": c, "image_id": i} for j in range(3) for i in range(4)
             for c in [captions_of(i, 3)[j]]]  # one record per caption, images interleaved
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(test))
    (tmp_path / "coco_karpathy_train.json").write_text(json.dumps(train))
    info = open_retrieval_set(tmp_path / "coco_karpathy_test.json", tmp_path / "coco")
    assert info.name == "coco_karpathy_test" and info.captions == [captions_of(i, 5) for i in range(4)]
    merged = open_retrieval_set(tmp_path / "coco_karpathy_train.json", tmp_path / "coco")
    assert merged.captions == [captions_of(i, 3) for i in range(4)]
    assert [ref.path.name for ref in merged.images] == [f"img_{i:04d}.png" for i in range(4)]


def test_karpathy_errors_name_the_file(tmp_path):
    write_karpathy_original(tmp_path / "dataset_coco.json", tmp_path / "coco", ["test", "val"])
    with pytest.raises(EvalSetError, match=r"--image-root .*elsewhere \(images of .*dataset_coco.json\) is not a dir"):
        open_retrieval_set(tmp_path / "dataset_coco.json", tmp_path / "elsewhere", "val")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(EvalSetError, match=r"1 of 1 images are not under --image-root"):
        open_retrieval_set(tmp_path / "dataset_coco.json", tmp_path / "elsewhere", "val")
    with pytest.raises(EvalSetError, match=r"dataset_coco.json holds no images in split 'train'"):
        open_retrieval_set(tmp_path / "dataset_coco.json", tmp_path / "coco", "train")
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(EvalSetError, match=r"bad.json: record 0 needs keys 'image' and 'caption'"):
        open_retrieval_set(tmp_path / "bad.json", tmp_path / "coco")


def test_clip_benchmark_wds_sets_read_as_written(tmp_path):
    templates = ["a photo of a {c}.", "a drawing of the {c}."]
    classes = ["cat", "dog", "bird"]
    written = write_wds_classification(tmp_path / "wds_cls", classes, per_class=4, templates=templates)
    assert sorted(os.listdir(tmp_path / "wds_cls" / "test")) == ["0.tar", "1.tar", "nshards.txt"]
    zs = open_zeroshot_set(tmp_path / "wds_cls")
    assert zs.classnames == classes and zs.layout == "clip_benchmark_wds"
    assert [t("cat") for t in zs.templates] == ["a photo of a cat.", "a drawing of the cat."]
    assert zs.labels == written.labels
    for i in (0, 7, 11):  # webp lossless: the very pixels
        assert np.array_equal(_pixels(zs.images[i]), np.asarray(written[i][0]))

    captions = write_wds_retrieval(tmp_path / "wds_ret", num_images=9)
    info = open_retrieval_set(tmp_path / "wds_ret")
    assert info.captions == [captions[i][1] for i in range(9)]
    assert np.array_equal(_pixels(info.images[8]), np.asarray(captions[8][0]))
    with pytest.raises(EvalSetError, match="dataset_type.txt says 'retrieval'"):
        open_zeroshot_set(tmp_path / "wds_ret")
    (tmp_path / "wds_ret" / "val").mkdir()
    (tmp_path / "wds_ret" / "val" / "0.tar").write_bytes(bytes(1024))  # an empty archive: two zero blocks
    with pytest.raises(EvalSetError, match=r"wds_ret/val holds no samples"):
        open_retrieval_set(tmp_path / "wds_ret", split="val")


def _torchvision_cifar(kind, root, train):
    """torchvision's own CIFAR reader over the stand-in, its md5 table pointed at the stand-in's files."""
    base = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / base.base_folder
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}
    table = {"train_list": [[n, md5[n]] for n, _ in base.train_list if n in md5],
             "test_list": [[n, md5[n]] for n, _ in base.test_list],
             "meta": {**base.meta, "md5": md5[base.meta["filename"]]}}
    return type("StandIn", (base,), table)(str(root), train=train, download=False)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["test", "train"])
def test_cifar_archives_read_as_torchvision_reads_them(tmp_path, kind, split):
    write_cifar(tmp_path, kind)
    reference = _torchvision_cifar(kind, tmp_path, train=split == "train")
    zs = open_zeroshot_set(tmp_path, split=split)
    assert zs.labels == list(reference.targets)
    assert zs.classnames == [c.replace("_", " ") for c in reference.classes]
    assert [t("cat") for t in zs.templates] == [t.replace("{c}", "cat") for t in CIFAR_TEMPLATES]
    for i in range(len(zs.images)):
        assert np.array_equal(_pixels(zs.images[i]), np.asarray(reference[i][0]))
    named = open_zeroshot_set(zs.directory, split=split)  # the archive folder itself
    assert named.labels == zs.labels


def test_cifar_unpickler_builds_arrays_only(tmp_path):
    write_cifar(tmp_path, "cifar10")

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(EvalSetError, match=r"test_batch: not a CIFAR python archive .*refusing to load"):
        open_zeroshot_set(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_imagefolder_and_prep_sets_still_open(tmp_path):
    from evalgen import make_imagefolder, make_retrieval_set

    make_imagefolder(tmp_path / "val", ["n01440764", "n01443537"], per_class=2)
    assert open_zeroshot_set(tmp_path / "val").layout == "imagefolder"
    captions = make_retrieval_set(tmp_path / "ret", num_images=3)
    assert open_retrieval_set(tmp_path / "ret").captions == captions
    with pytest.raises(EvalSetError, match="--split must be one of"):
        open_zeroshot_set(tmp_path / "val", split="dev")
