"""``clip-dro eval`` of several models at once: one comparison table (CSV + Markdown) and one plot, whose numbers
are each model's own single-model results; labels; one-line refusals of options that do not pair up."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from clip_dro.cli import main
from clip_dro.evaluation.run import ModelUnderTest, evaluate_from_cli, model_labels
from clip_dro.models import build_model
from evalgen import CLASSES, TEMPLATES, make_checkpoint, make_retrieval_set, make_train_set, make_zeroshot_shards


@pytest.fixture(scope="module")
def inputs(module_tmp) -> Path:
    root = module_tmp("several")
    make_retrieval_set(root / "ret", num_images=8, seed=2)
    make_zeroshot_shards(root / "zs", CLASSES, per_class=2, templates=TEMPLATES)
    make_train_set(root / "train", {"cat": 0.5, "dog": 0.3, "bird": 0.1, "fish": 0.05})
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        torch.save(build_model("tiny-vit").model.state_dict(), root / name)
    make_checkpoint(root / "runs" / "mine" / "final", seed=2)
    return root


@pytest.mark.slow
def test_several_models_give_one_table_of_their_single_results(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_DRO_CACHE", str(tmp_path / "cache"))
    sets = ["--retrieval", str(inputs / "ret"), "--zeroshot", str(inputs / "zs")]
    common = [*sets, "--batch-size", "4", "--workers", "0", "--train-data", str(inputs / "train")]
    out = tmp_path / "cmp"
    assert main(["eval", "--checkpoint", str(inputs / "runs" / "mine"), "--model", "tiny-vit", "--pretrained",
                 str(inputs / "a.pt"), "--model", "tiny-vit", "--pretrained", str(inputs / "b.pt"), *common,
                 "--output", str(out)]) == 0
    single = {"mine": evaluate_from_cli(checkpoint=inputs / "runs" / "mine", retrieval=[inputs / "ret"],
                                        zeroshot=[inputs / "zs"], output=tmp_path / "mine.json", batch_size=4),
              **{f"tiny-vit {name}": evaluate_from_cli(model="tiny-vit", pretrained=inputs / name,
                                                       retrieval=[inputs / "ret"], zeroshot=[inputs / "zs"],
                                                       output=tmp_path / f"{name}.json", batch_size=4)
                 for name in ("a.pt", "b.pt")}}

    table = pd.read_csv(out / "comparison.csv", index_col="model")
    assert table.index.tolist() == ["mine", "tiny-vit a.pt", "tiny-vit b.pt"]  # checkpoints, then models in order
    for label, document in single.items():
        for result in document["results"]:
            for metric, value in result["metrics"].items():
                assert table.loc[label, f"{result['dataset']}/{metric}"] == pytest.approx(value, abs=1e-9)
        # each model's own document, with its tail analysis, beside the table
        written = json.loads((out / f"{label.replace(' ', '-')}.json").read_text())
        assert [r["metrics"] for r in written["results"]] == [r["metrics"] for r in document["results"]]
        assert written["results"][1]["tail"]["terciles"]["head"]["accuracy"] == table.loc[label, "zs/tail:head"]
    assert table.loc["tiny-vit a.pt", "ret/r_mean"] != table.loc["tiny-vit b.pt", "ret/r_mean"]  # other weights
    assert {"zs/tail:head", "zs/tail:torso", "zs/tail:tail", "ret/tail:tail"} <= set(table.columns)

    lines = (out / "comparison.md").read_text().splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith("| mine | ")
    with Image.open(out / "comparison.png") as image:
        assert image.size[0] > 500
    assert (out / "tail" / "tiny-vit-a.pt" / "zs_tail.png").is_file()
    bench = pd.read_csv(out / "clip_benchmark" / "benchmark.csv")
    assert len(bench) == 3 * 2 and bench["pretrained"].nunique() == 3  # no model's files overwrote another's


def _source(checkpoint=None, model="tiny-vit", pretrained=None) -> ModelUnderTest:
    return ModelUnderTest(model, pretrained, None if checkpoint is None else Path(checkpoint) / "final",
                          named=checkpoint or model)


def test_labels_are_short_and_distinct():
    assert model_labels([_source("q/runs/clip"), _source("q/runs/isogclr"), _source(model="ViT-B-32"),
                         _source(model="RN50", pretrained="/w/RN50.pt")]) == ["clip", "isogclr", "ViT-B-32", "RN50"]
    assert model_labels([_source("a/clip"), _source("b/clip"), _source(pretrained="/w/x.pt"),
                         _source(pretrained="/v/y.pt"), _source()]) == ["a/clip", "b/clip", "tiny-vit x.pt",
                                                                       "tiny-vit y.pt", "tiny-vit random"]
    assert model_labels([_source(pretrained="/w/x.pt"), _source(pretrained="/v/x.pt")]) == [
        "tiny-vit x.pt #1", "tiny-vit x.pt #2"]


def test_options_that_do_not_pair_up_are_one_line_errors(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*args):
        assert main(["eval", *map(str, args), "--zeroshot", str(inputs / "zs")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    a, b = inputs / "a.pt", inputs / "b.pt"
    assert "--pretrained: 1 given for 2 --model; give one per --model, in order" in run(
        "--model", "tiny-vit", "--model", "tiny-vit", "--pretrained", a)
    assert "--pretrained and --text-tower go with --model" in run("--checkpoint", inputs / "runs/mine",
                                                                  "--pretrained", a)
    assert "--output cmp.json: with several models it names a directory" in run(
        "--model", "tiny-vit", "--pretrained", a, "--model", "tiny-vit", "--pretrained", b, "--output", "cmp.json")
    assert "--export copies the open_clip state dict of one --checkpoint" in run(
        "--checkpoint", inputs / "runs/mine", inputs / "runs/mine", "--export", "x.pt")
    assert "name what to evaluate" in run()
    assert not list(tmp_path.iterdir())  # refused before anything is written
