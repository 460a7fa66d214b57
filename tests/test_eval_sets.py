"""Reading retrieval and zero-shot sets, decoding their images, and their clear errors."""
import io
import json
import re
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from clip_dro.data.eval_sets import (EvalSetError, ImageRef, check_retrieval_set, image_batches, iter_sample_json,
                                     load_zeroshot_set)
from clip_dro.errors import UserError
from evalgen import (bomb_png, image, make_imagefolder, make_retrieval_set, make_zeroshot_shards, png_bytes,
                     truncated_png, write_shards)

PREPROCESS = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def _shard_images(directory, ext):
    """The image bytes of every sample, read with tarfile alone, in manifest order."""
    out = []
    for shard in json.loads((directory / "manifest.json").read_text())["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith("." + ext)]
    return out


def _preprocessed(data):
    return PREPROCESS(Image.open(io.BytesIO(data)).convert("RGB"))


def test_retrieval_set_in_manifest_order(tmp_path):
    captions = make_retrieval_set(tmp_path / "ret", num_images=10, shard_size=4)
    info = check_retrieval_set(tmp_path / "ret")
    assert (info.name, info.num_samples, info.num_texts) == ("ret", 10, sum(map(len, captions)))
    assert info.captions == captions
    assert [ref.where for ref in info.images] == [
        f"{tmp_path / 'ret' / f'shard-{i // 4:05d}.tar'}: sample {i:09d}" for i in range(10)]
    batches = list(image_batches(info.images, PREPROCESS, batch_size=3))
    assert [b.rows for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert all(not b.bad for b in batches)
    want = torch.stack([_preprocessed(data) for data in _shard_images(tmp_path / "ret", "png")])
    assert torch.equal(torch.cat([b.images for b in batches]), want)


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
    assert zs.labels == labels
    images = torch.cat([b.images for b in image_batches(zs.images, PREPROCESS, 4)])
    assert torch.equal(images, torch.stack([_preprocessed(data) for data in _shard_images(tmp_path / "zs", "jpg")]))


def test_zeroshot_default_templates_are_open_clip_imagenet_ones(tmp_path):
    make_zeroshot_shards(tmp_path / "zs", ["cat", "dog"])
    templates = load_zeroshot_set(tmp_path / "zs").templates
    assert [t("x") for t in templates] == [t("x") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]


def test_zeroshot_imagefolder(tmp_path):
    make_imagefolder(tmp_path / "zs", ["b_dog", "a_cat"], per_class=2)
    (tmp_path / "zs" / ".cache").mkdir()  # not a class, as for ImageNet tools' hidden folders
    zs = load_zeroshot_set(tmp_path / "zs")
    assert (zs.layout, zs.num_samples, zs.classnames) == ("imagefolder", 4, ["a_cat", "b_dog"])
    files = [tmp_path / "zs" / folder / f"img{i}.png" for folder in ["a_cat", "b_dog"] for i in range(2)]
    assert zs.labels == [0, 0, 1, 1] and [ref.where for ref in zs.images] == [str(f) for f in files]
    batch = next(iter(image_batches(zs.images, PREPROCESS, 8)))
    assert torch.equal(batch.images, torch.stack([_preprocessed(f.read_bytes()) for f in files]))
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


@pytest.mark.parametrize("workers", [0, 2])
def test_image_batches_hand_back_undecodable_images(tmp_path, workers):
    good = [png_bytes(image(np.random.default_rng(i))) for i in range(4)]
    files = {"a.png": good[0], "garbage.png": b"not an image", "b.png": good[1], "c.png": good[2],
             "truncated.png": truncated_png(), "bomb.png": bomb_png(), "d.png": good[3]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(Image.DecompressionBombError):  # what the fixture is for
        Image.open(io.BytesIO(bomb_png()))
    refs = [ImageRef(str(tmp_path / name), tmp_path / name) for name in files]
    batches = list(image_batches(refs, PREPROCESS, batch_size=3, workers=workers))
    assert [b.rows for b in batches] == [[0, 2], [3], [6]]
    assert torch.equal(torch.cat([b.images for b in batches]), torch.stack([_preprocessed(d) for d in good]))
    bad = [x for b in batches for x in b.bad]
    assert [x.where for x in bad] == [str(tmp_path / n) for n in ["garbage.png", "truncated.png", "bomb.png"]]
    assert [x.reason.split(":")[0] for x in bad] == ["UnidentifiedImageError", "OSError", "DecompressionBombError"]
    assert all("\n" not in x.reason for x in bad)


def _cut_points(shard):
    """Offsets inside image data, inside a member header and at a member boundary, away from the start."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    image = next(m for m in members[3:] if m.name.endswith((".png", ".jpg")))
    header = members[4]
    return {"in image data": image.offset_data + image.size // 2, "in a header": header.offset + 100,
            "at a member boundary": header.offset}


@pytest.mark.parametrize("where", ["in image data", "in a header", "at a member boundary"])
@pytest.mark.parametrize("kind", ["retrieval", "zeroshot"])
def test_truncated_shard_is_named(tmp_path, kind, where):
    if kind == "retrieval":
        make_retrieval_set(tmp_path / "set", num_images=6, shard_size=3)
        load = check_retrieval_set
    else:
        make_zeroshot_shards(tmp_path / "set", ["cat", "dog"], per_class=3, shard_size=3)
        load = load_zeroshot_set
    shard = tmp_path / "set" / "shard-00000.tar"
    shard.write_bytes(shard.read_bytes()[:_cut_points(shard)[where]])
    with pytest.raises(EvalSetError, match=re.escape(str(shard)) + ".*truncated or damaged"):
        load(tmp_path / "set")


def test_shard_not_holding_what_the_manifest_lists(tmp_path):
    make_retrieval_set(tmp_path / "ret", num_images=6, shard_size=3)
    path = tmp_path / "ret" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["num_samples"], manifest["shards"][1]["num_samples"] = 2, 4
    manifest["shards"][1]["first_index"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(EvalSetError, match=r"shard-00000.tar holds 3 samples but .*manifest.json lists 2"):
        check_retrieval_set(tmp_path / "ret")


@pytest.mark.parametrize("kind", ["retrieval", "zeroshot"])
def test_damaged_manifest_is_named(tmp_path, kind):
    if kind == "retrieval":
        make_retrieval_set(tmp_path / "set", num_images=3)
    else:
        make_zeroshot_shards(tmp_path / "set", ["cat", "dog"])
    path = tmp_path / "set" / "manifest.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(UserError, match=re.escape(str(path)) + ": not valid JSON"):
        (check_retrieval_set if kind == "retrieval" else load_zeroshot_set)(tmp_path / "set")
