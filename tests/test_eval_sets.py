"""Reading retrieval and zero-shot sets, and their clear errors."""
import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T

from clip_dro.data.eval_sets import (EvalSetError, check_retrieval_set, iter_retrieval_batches, iter_sample_json,
                                     load_zeroshot_set)
from clip_dro.errors import UserError
from evalgen import image, make_imagefolder, make_retrieval_set, make_zeroshot_shards, write_shards

PREPROCESS = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def test_retrieval_batches_in_manifest_order(tmp_path):
    captions = make_retrieval_set(tmp_path / "ret", num_images=10, shard_size=4)
    info = check_retrieval_set(tmp_path / "ret")
    assert (info.name, info.num_samples, info.num_texts) == ("ret", 10, sum(map(len, captions)))
    batches = list(iter_retrieval_batches(tmp_path / "ret", PREPROCESS, batch_size=3))
    assert [len(b[1]) for b in batches] == [3, 3, 3, 1]
    assert batches[0][0].shape == (3, 3, 8, 8)
    assert [c for b in batches for c in b[1]] == captions
    assert [i for b in batches for i in b[2]] == list(range(10))
    assert [t for b in batches for ts in b[3] for t in ts] == list(range(info.num_texts))


def test_sample_json_scan_reads_every_record(tmp_path):
    make_retrieval_set(tmp_path / "ret", num_images=6, shard_size=4)
    assert [m["index"] for m in iter_sample_json(tmp_path / "ret")] == list(range(6))


def _broken_retrieval_set(directory, **changes):
    rng = np.random.default_rng(0)
    samples = [{"png": image(rng), "txt": "a cat\na dog", "json": {"index": i, "image_index": i,
                                                                    "text_index": [2 * i, 2 * i + 1]}}
               for i in range(3)]
    samples[1].update(changes)
    samples[1] = {k: v for k, v in samples[1].items() if v is not None}
    write_shards(directory, samples, 2, "retrieval", num_texts=6)


@pytest.mark.parametrize("changes, message", [
    ({"txt": ""}, "has no captions"),
    ({"txt": None}, "has no captions"),
    ({"txt": "only one caption"}, "1 caption lines in .txt but 2 entries"),
    ({"png": None}, "has no image"),
    ({"json": {"index": 1, "image_index": 0, "text_index": [2, 3]}}, "image_index 0 appears in an earlier sample"),
    ({"json": {"index": 1, "text_index": [2, 3]}}, "'image_index' should be an integer"),
])
def test_bad_retrieval_sample_is_named(tmp_path, changes, message):
    _broken_retrieval_set(tmp_path / "ret", **changes)
    with pytest.raises(EvalSetError, match=message) as err:
        check_retrieval_set(tmp_path / "ret")
    assert "shard-00000.tar: sample 000000001" in str(err.value)


def test_reader_names_sample_without_captions_too(tmp_path):
    _broken_retrieval_set(tmp_path / "ret", txt="")
    with pytest.raises(EvalSetError, match="shard-00000.tar: sample 000000001 has no captions"):
        list(iter_retrieval_batches(tmp_path / "ret", PREPROCESS, 2))


def test_missing_sets_are_clear_errors(tmp_path):
    with pytest.raises(EvalSetError, match="retrieval set .*nope does not exist"):
        check_retrieval_set(tmp_path / "nope")
    with pytest.raises(EvalSetError, match="zero-shot set .*nope does not exist"):
        load_zeroshot_set(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not a prep output directory"):
        check_retrieval_set(tmp_path / "empty")
    with pytest.raises(EvalSetError, match="neither manifest.json .* nor class sub-folders"):
        load_zeroshot_set(tmp_path / "empty")


def test_zeroshot_shards(tmp_path):
    labels = make_zeroshot_shards(tmp_path / "zs", ["cat", "dog", "bird"], per_class=3,
                                  templates=["a photo of a {c}.", "{c}!"])
    zs = load_zeroshot_set(tmp_path / "zs")
    assert (zs.name, zs.layout, zs.num_samples, zs.classnames) == ("zs", "shards", 9, ["cat", "dog", "bird"])
    assert [t("red fox") for t in zs.templates] == ["a photo of a red fox.", "red fox!"]
    batches = list(zs.batches(PREPROCESS, 4))
    assert torch.cat([b[1] for b in batches]).tolist() == labels
    assert batches[0][0].shape == (4, 3, 8, 8)


def test_zeroshot_default_templates_are_open_clip_imagenet_ones(tmp_path):
    make_zeroshot_shards(tmp_path / "zs", ["cat", "dog"])
    templates = load_zeroshot_set(tmp_path / "zs").templates
    assert [t("x") for t in templates] == [t("x") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]


def test_zeroshot_imagefolder(tmp_path):
    make_imagefolder(tmp_path / "zs", ["b_dog", "a_cat"], per_class=2)
    zs = load_zeroshot_set(tmp_path / "zs")
    assert (zs.layout, zs.num_samples, zs.classnames) == ("imagefolder", 4, ["a_cat", "b_dog"])
    images, labels = next(zs.batches(PREPROCESS, 8))
    assert labels.tolist() == [0, 0, 1, 1] and images.shape == (4, 3, 8, 8)
    (tmp_path / "zs" / "classnames.txt").write_text("cat\ndog\n")
    assert load_zeroshot_set(tmp_path / "zs").classnames == ["cat", "dog"]


def test_imagefolder_of_1000_wordnet_ids_gets_imagenet_names(tmp_path):
    png = tmp_path / "one.png"
    image(np.random.default_rng(0), 2).save(png)
    for i in range(1000):
        (tmp_path / "val" / f"n{i:08d}").mkdir(parents=True)
        (tmp_path / "val" / f"n{i:08d}" / "x.png").write_bytes(png.read_bytes())
    zs = load_zeroshot_set(tmp_path / "val")
    assert zs.classnames == list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES)


def test_classnames_not_matching_shard_labels(tmp_path):
    make_zeroshot_shards(tmp_path / "zs", ["cat", "dog", "bird"])
    (tmp_path / "zs" / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(EvalSetError, match=r"has label 2 but .*classnames.txt has 2 class names"):
        load_zeroshot_set(tmp_path / "zs")


def test_classnames_not_matching_imagefolder(tmp_path):
    make_imagefolder(tmp_path / "zs", ["a", "b", "c"], per_class=1, classnames=["x", "y"])
    with pytest.raises(EvalSetError, match="classnames.txt has 2 class names but .* has 3 class sub-folders"):
        load_zeroshot_set(tmp_path / "zs")


@pytest.mark.parametrize("filename, text, message", [
    ("templates.txt", "a photo of {c}\na photo\n", "templates.txt line 2 has no {c} placeholder"),
    ("classnames.txt", "cat\n\ndog\n", "classnames.txt line 2 is empty"),
    ("classnames.txt", "\n", "classnames.txt is empty"),
])
def test_bad_zeroshot_text_files(tmp_path, filename, text, message):
    make_zeroshot_shards(tmp_path / "zs", ["cat", "dog"])
    (tmp_path / "zs" / filename).write_text(text)
    with pytest.raises(EvalSetError, match=message):
        load_zeroshot_set(tmp_path / "zs")


def test_zeroshot_shards_need_labels_and_classnames(tmp_path):
    rng = np.random.default_rng(0)
    write_shards(tmp_path / "zs", [{"jpg": image(rng), "json": {"index": 0}}], 2, "zeroshot")
    with pytest.raises(EvalSetError, match="has no classnames.txt"):
        load_zeroshot_set(tmp_path / "zs")
    (tmp_path / "zs" / "classnames.txt").write_text("cat\n")
    with pytest.raises(EvalSetError, match="sample 000000000 has no .cls label"):
        load_zeroshot_set(tmp_path / "zs")
