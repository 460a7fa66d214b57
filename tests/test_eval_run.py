"""End-to-end evaluation of a generated checkpoint, compared with a direct computation written here
(tarfile + PIL reading, open_clip loading, brute-force metrics); checkpoint resolution; bad inputs."""
import io
import json
import tarfile
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_dro.cli import main
from clip_dro.config import Config, save_config
from clip_dro.data.eval_sets import EvalSetError
from clip_dro.evaluation.checkpoint import CheckpointError, load_checkpoint_model, resolve_checkpoint
from clip_dro.evaluation.run import EvalError, evaluate, evaluate_from_cli
from clip_dro.models import build_model, register_model_configs
from evalgen import (brute_force_classification, brute_force_retrieval, make_checkpoint, make_imagefolder,
                     make_retrieval_set, make_train_set, make_zeroshot_shards)

BATCH = 4
TEMPLATES = ["a photo of a {c}.", "a {c} drawn in pencil"]


def _read_shards(directory: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((directory / "manifest.json").read_text())["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(f"{shard['name']}/{key}", {})[ext] = tar.extractfile(m).read()
    return list(samples.values())


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
        captions = [s["txt"].decode().split("\n") for s in samples]
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
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
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
    with tarfile.open(tmp_path / "nocap" / "shard-00000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "nocap" / "shard-00000.tar", "w") as tar:
        for m, data in members:
            if m.name == "000000002.txt":
                data, m.size = b"", 0
            tar.addfile(m, io.BytesIO(data))
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
