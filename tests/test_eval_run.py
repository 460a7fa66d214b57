"""End-to-end evaluation of a generated checkpoint, compared with a direct computation written here
(tarfile + PIL reading, open_clip loading, brute-force metrics); checkpoint resolution; bad inputs: bad images,
non-finite embeddings, bad options."""
import io
import json
import re
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_dro.bench.faults import rewrite_members
from clip_dro.cli import main
from clip_dro.config import Config, save_config
from clip_dro.data.eval_sets import EvalSetError
from clip_dro.checkpoint import CheckpointError, load_checkpoint_model, resolve_checkpoint
from clip_dro.evaluation.run import EvalError, NonFiniteEmbeddingError, evaluate, evaluate_from_cli
from clip_dro.models import build_model, register_model_configs
from clip_dro.data.shard_reader import caption_lines
from datagen import read_tar
from evalgen import (CLASSES, FRUITS, TEMPLATES, brute_force_classification, brute_force_retrieval, eval_set_args,
                     make_checkpoint, make_imagefolder, make_retrieval_set, make_train_set, make_zeroshot_shards)

BATCH = 4


def _read_shards(directory: Path) -> list[dict[str, bytes]]:
    """Each sample's members (ext -> bytes), read with the standard library."""
    shards = json.loads((directory / "manifest.json").read_text())["shards"]
    return [files for shard in shards for files in read_tar(directory / shard["name"]).values()]


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class Direct:
    """The checkpoint's model loaded with open_clip alone, encoding in batches of BATCH like the evaluator."""

    def __init__(self, ckpt: Path):
        register_model_configs()
        self.model, _, self.preprocess = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(ckpt / "model.pt"))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer("tiny-vit")

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([F.normalize(self.model.encode_image(torch.stack([self.preprocess(i) for i in images[s:s + BATCH]])), dim=-1)
                          for s in range(0, len(images), BATCH)])

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts)), dim=-1)

    def retrieval(self, directory: Path) -> dict[str, float]:
        samples = _read_shards(directory)
        captions = [caption_lines(s["txt"], "test") for s in samples]
        image_features = self.images([_open(s["png"]) for s in samples])
        text_features = torch.cat([self.texts([c for caps in captions[s:s + BATCH] for c in caps])
                                   for s in range(0, len(captions), BATCH)])
        text_to_image = [i for i, caps in enumerate(captions) for _ in caps]
        return brute_force_retrieval(image_features, text_features, text_to_image)

    def classification(self, images: list[Image.Image], labels: list[int], classnames: list[str],
                       templates: list) -> dict[str, float]:
        with torch.no_grad():
            weights = []
            for name in classnames:
                mean = self.texts([t(name) for t in templates]).mean(dim=0)
                weights.append(mean / mean.norm())
        logits = self.images(images) @ torch.stack(weights, dim=1)
        return brute_force_classification(logits, torch.tensor(labels))


@pytest.fixture(scope="module")
def sets(module_tmp):
    root = module_tmp("sets")
    make_retrieval_set(root / "coco_test", num_images=11, shard_size=4, seed=1)
    make_zeroshot_shards(root / "zs_shards", ["cat", "dog", "bird", "fish", "horse", "cow"], per_class=2,
                         shard_size=5, templates=TEMPLATES)
    make_imagefolder(root / "zs_folder", ["apple", "banana", "cherry"], per_class=2)
    return root


def _assert_metrics_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_evaluate_from_cli_matches_direct_computation(tmp_path, sets, capsys):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "step-2", seed=1)
    ckpt = make_checkpoint(run / "checkpoints" / "step-10", seed=2)
    doc = evaluate_from_cli(checkpoint=run, retrieval=[sets / "coco_test"],
                            zeroshot=[sets / "zs_shards", sets / "zs_folder"], output=None, batch_size=BATCH,
                            export=tmp_path / "export" / "open_clip.pt")

    assert json.loads((ckpt / "eval.json").read_text()) == doc
    assert doc["checkpoint"] == str(ckpt)
    assert [(r["task"], r["dataset"]) for r in doc["results"]] == [
        ("retrieval", "coco_test"), ("zeroshot_classification", "zs_shards"),
        ("zeroshot_classification", "zs_folder")]
    table = capsys.readouterr().out
    assert "coco_test" in table and "r_mean" in table and "mean_per_class_recall" in table

    direct = Direct(ckpt)
    _assert_metrics_equal(doc["results"][0]["metrics"], direct.retrieval(sets / "coco_test"))
    shards = _read_shards(sets / "zs_shards")
    _assert_metrics_equal(doc["results"][1]["metrics"], direct.classification(
        [_open(s["jpg"]) for s in shards], [int(s["cls"]) for s in shards],
        ["cat", "dog", "bird", "fish", "horse", "cow"], [lambda c, t=t: t.replace("{c}", c) for t in TEMPLATES]))
    folder = [(_open(p.read_bytes()), label) for label, name in enumerate(["apple", "banana", "cherry"])
              for p in sorted((sets / "zs_folder" / name).iterdir())]
    _assert_metrics_equal(doc["results"][2]["metrics"], direct.classification(
        [i for i, _ in folder], [label for _, label in folder], ["apple", "banana", "cherry"],
        list(open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)))

    exported = torch.load(tmp_path / "export" / "open_clip.pt")
    assert all(torch.equal(v, direct.model.state_dict()[k]) for k, v in exported.items())


def test_config_defaults_and_temperature_analysis(tmp_path, sets):
    metas = make_train_set(tmp_path / "train", {"a": 0.5, "b": 0.3, "c": 0.2})
    cfg = Config()
    cfg.data.train = str(tmp_path / "train")
    cfg.eval.retrieval = [str(sets / "coco_test")]
    cfg.eval.zeroshot = [str(sets / "zs_shards")]
    run = tmp_path / "run"
    ckpt = make_checkpoint(run / "final", cfg=cfg)
    make_checkpoint(run / "checkpoints" / "step-50")  # final/ wins over any step
    rows = [("image", m["image_index"], m["concept_frequency"]) for m in metas]
    rows += [("text", t, 1 - m["concept_frequency"]) for m in metas for t in m["text_index"]]
    pd.DataFrame(rows, columns=["side", "index", "tau"]).to_csv(ckpt / "temperatures.csv", index=False)

    doc = evaluate_from_cli(checkpoint=run, retrieval=[], zeroshot=[], output=tmp_path / "out" / "r.json",
                            batch_size=3, export=None)
    assert [r["dataset"] for r in doc["results"]] == ["coco_test", "zs_shards"]
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == doc
    # Sets named on the command line replace the config's lists.
    only = evaluate_from_cli(checkpoint=run, retrieval=[sets / "coco_test"], zeroshot=[], output=None,
                             batch_size=3, export=None)
    assert [r["dataset"] for r in only["results"]] == ["coco_test"]
    assert only["results"][0] == doc["results"][0]
    summary = json.loads((ckpt / "temperature_analysis" / "summary.json").read_text())
    assert summary["concept_frequency"]["image"]["spearman"] == pytest.approx(1.0)
    assert summary["concept_frequency"]["text"]["spearman"] == pytest.approx(-1.0)


def test_evaluate_during_training_restores_train_mode(sets):
    torch.manual_seed(0)
    bundle = build_model("tiny-vit")
    bundle.model.train()
    results = evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_eval, [sets / "coco_test"],
                       [sets / "zs_shards"], batch_size=8, device="cpu")
    assert all(m.training for m in bundle.model.modules())
    assert [r["task"] for r in results] == ["retrieval", "zeroshot_classification"]
    assert set(results[0]["metrics"]) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "r_mean"}
    assert set(results[1]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}


def test_resolve_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert resolve_checkpoint(ckpt) == ckpt
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory .* nor a run directory"):
        resolve_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-9").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-10.tmp").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_checkpoint(tmp_path / "run")  # step-9 without model.pt is not a checkpoint


def test_checkpoint_not_matching_model_config(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", model_name="tiny-vit")
    cfg = Config()
    cfg.model.name = "tiny-rn"
    save_config(cfg, ckpt / "config.yaml")
    with pytest.raises(CheckpointError, match=r"model.pt does not match model 'tiny-rn' of its config"):
        load_checkpoint_model(ckpt)
    assert main(["eval", "--checkpoint", str(ckpt), "--export", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip-dro eval: error: checkpoint ") and "tiny-rn" in err and "\n" not in err


def test_bad_eval_set_fails_before_the_model_is_loaded(tmp_path, sets):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.pt").write_bytes(b"not a state dict")  # would fail if loading came first
    make_retrieval_set(tmp_path / "ret", num_images=3)
    (tmp_path / "ret" / "shard-00000.tar").unlink()
    make_retrieval_set(tmp_path / "nocap", num_images=3)
    rewrite_members(tmp_path / "nocap" / "shard-00000.tar", lambda name, b: b"" if name == "000000002.txt" else b)
    with pytest.raises(EvalSetError, match="sample 000000002 has no captions"):
        evaluate_from_cli(checkpoint=ckpt, retrieval=[sets / "coco_test", tmp_path / "nocap"], zeroshot=[],
                          output=None, batch_size=4, export=None)
    with pytest.raises(CheckpointError, match="model.pt does not match"):
        evaluate_from_cli(checkpoint=ckpt, retrieval=[sets / "coco_test"], zeroshot=[], output=None,
                          batch_size=4, export=None)
    assert not (ckpt / "eval.json").exists()


def test_nothing_to_evaluate(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate_from_cli(checkpoint=ckpt, retrieval=[], zeroshot=[], output=None, batch_size=4, export=None)
    with pytest.raises(EvalError, match="--batch-size"):
        evaluate_from_cli(checkpoint=ckpt, retrieval=[], zeroshot=[], output=None, batch_size=0, export=None)


@pytest.mark.parametrize("options, message", [({"workers": -1}, "--workers"),
                                              ({"on_bad_image": "ignore"}, "--on-bad-image")])
def test_bad_options_fail_before_anything_is_read(tmp_path, options, message):
    with pytest.raises(EvalError, match=message):  # the checkpoint does not even exist
        evaluate_from_cli(checkpoint=tmp_path / "missing", retrieval=[], zeroshot=[], output=None, batch_size=4,
                          export=None, **options)
    bundle = build_model("tiny-vit")
    with pytest.raises(EvalError, match=message):
        evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_eval, [tmp_path / "missing"], [], 4, "cpu",
                 **options)


# --------------------------------------------------------------------------------- non-finite embeddings


class NaNRows(torch.nn.Module):
    """A model whose ``side`` ("image" or "text") embeddings are NaN in the first row of every batch."""

    def __init__(self, model: torch.nn.Module, side: str):
        super().__init__()
        self.model, self.side = model, side

    def _spoil(self, features: torch.Tensor, side: str) -> torch.Tensor:
        if side == self.side:
            features = features.clone()
            features[0] = float("nan")
        return features

    def encode_image(self, images, normalize=False):
        return self._spoil(self.model.encode_image(images, normalize=normalize), "image")

    def encode_text(self, text, normalize=False):
        return self._spoil(self.model.encode_text(text, normalize=normalize), "text")


@pytest.mark.parametrize("kind, side, message", [
    ("retrieval", "image", "3 of 11 image embeddings are not finite"),  # 11 images in batches of 4
    ("retrieval", "text", "3 of {texts} text embeddings are not finite"),  # the captions of each image batch
    ("zeroshot", "image", "3 of 12 image embeddings are not finite"),
    ("zeroshot", "text", "1 of 6 class embeddings are not finite"),  # the first prompt of the first class
])
def test_non_finite_embeddings_name_the_set_side_and_count(sets, kind, side, message):
    torch.manual_seed(0)
    bundle = build_model("tiny-vit")
    directory = sets / ("coco_test" if kind == "retrieval" else "zs_shards")
    texts = sum(len(caption_lines(s["txt"], "test")) for s in _read_shards(sets / "coco_test"))
    expected = re.escape(f"eval set {directory}: " + message.format(texts=texts))
    with pytest.raises(NonFiniteEmbeddingError, match=expected):
        evaluate(NaNRows(bundle.model, side), bundle.tokenizer, bundle.preprocess_eval,
                 [directory] if kind == "retrieval" else [], [directory] if kind == "zeroshot" else [], BATCH, "cpu")


# ------------------------------------------------------------------------------------------- bad images

# bad_sets (conftest.py): BAD's images in the middle of a batch and at the start of one, so that the rows after
# them must still line up with their captions and labels.

def test_bad_images_are_skipped_and_counted(tmp_path, bad_sets, capsys):
    bad, clean = bad_sets
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    assert main(["eval", "--checkpoint", str(ckpt), *eval_set_args(bad), "--batch-size", str(BATCH), "--workers", "2",
                 "--output", str(tmp_path / "bad.json")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "bad.json").read_text())
    results = {r["dataset"]: r for r in doc["results"]}

    # Metrics as if the bad files were not there, computed directly on the clean sets.
    direct = Direct(ckpt)
    _assert_metrics_equal(results["coco_test"]["metrics"], direct.retrieval(clean / "coco_test"))
    shards = _read_shards(clean / "zs_shards")
    _assert_metrics_equal(results["zs_shards"]["metrics"], direct.classification(
        [_open(s["jpg"]) for s in shards], [int(s["cls"]) for s in shards], CLASSES,
        [lambda c, t=t: t.replace("{c}", c) for t in TEMPLATES]))
    folder = [(_open(p.read_bytes()), label) for label, name in enumerate(FRUITS)
              for p in sorted((clean / "zs_folder" / name).iterdir())]
    _assert_metrics_equal(results["zs_folder"]["metrics"], direct.classification(
        [i for i, _ in folder], [label for _, label in folder], FRUITS,
        [lambda c, t=t: t.replace("{c}", c) for t in TEMPLATES]))

    ret = bad / "coco_test"
    assert results["coco_test"]["skipped_images"] == 2
    assert [e["image"] for e in results["coco_test"]["skipped_examples"]] == [
        f"{ret / 'shard-00001.tar'}: sample 000000005", f"{ret / 'shard-00002.tar'}: sample 000000008"]
    assert [e["reason"].split(":")[0] for e in results["coco_test"]["skipped_examples"]] == [
        "DecompressionBombError", "OSError"]
    assert results["zs_shards"]["skipped_images"] == 1
    assert results["zs_shards"]["skipped_examples"][0]["image"] == (
        f"{bad / 'zs_shards' / 'shard-00000.tar'}: sample 000000003")
    assert results["zs_folder"]["skipped_examples"] == [
        {"image": str(bad / "zs_folder" / "banana" / "img0.png"), "reason": "OSError: image file is truncated"}]

    assert re.search(r"coco_test .* 2\n", out) and "skipped_images" in out
    assert f"coco_test: skipped {ret / 'shard-00001.tar'}: sample 000000005: DecompressionBombError: Image size" in out

    # Decoding in this process gives the same document.
    assert main(["eval", "--checkpoint", str(ckpt), *eval_set_args(bad), "--batch-size", str(BATCH), "--workers", "0",
                 "--output", str(tmp_path / "inline.json")]) == 0
    assert json.loads((tmp_path / "inline.json").read_text()) == doc


@pytest.mark.parametrize("name, where", [
    ("coco_test", "coco_test/shard-00001.tar: sample 000000005: cannot decode the image (DecompressionBombError"),
    ("zs_shards", "zs_shards/shard-00000.tar: sample 000000003: cannot decode the image (UnidentifiedImageError"),
    ("zs_folder", "zs_folder/banana/img0.png: cannot decode the image (OSError: image file is truncated)"),
])
def test_bad_image_with_on_bad_image_error_is_one_line(tmp_path, bad_sets, capsys, name, where):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    kind = "--retrieval" if name == "coco_test" else "--zeroshot"
    assert main(["eval", "--checkpoint", str(ckpt), kind, str(bad_sets[0] / name), "--batch-size", str(BATCH),
                 "--workers", "2", "--on-bad-image", "error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip-dro eval: error: ") and "\n" not in err
    assert str(bad_sets[0] / where) in err and "--on-bad-image skip" in err
    assert not (ckpt / "eval.json").exists()


def test_set_without_a_decodable_image_is_an_error(tmp_path):
    make_imagefolder(tmp_path / "zs", ["a", "b"], per_class=1, replace={0: b"", 1: b"GIF89a"})
    bundle = build_model("tiny-vit")
    with pytest.raises(EvalSetError, match=f"eval set {tmp_path / 'zs'}: none of its 2 images can be decoded"):
        evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_eval, [], [tmp_path / "zs"], BATCH, "cpu")
