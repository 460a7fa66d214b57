"""Several training sources (data.train as a list, data.weights, data.samples_per_epoch): dense, disjoint
global indices with one state entry per sample of every source, every sample of every source once per epoch,
a weighted virtual epoch that is the same at any number of processes and on resume, resume refused on other
sources, and the config's one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clip_dro.bench import launch
from clip_dro.checkpoint import TrainerState, read_loss_state, read_temperatures
from clip_dro.cli import main
from clip_dro.data.lanes import plan_resampled_epoch
from clip_dro.data.train_loader import TrainLoader
from clip_dro.evaluation.temperatures import analyze_temperatures
from data_prep.synthetic import prep_synthetic
from data_prep.tabular import prep_table
from datagen import captions_table, id_of_image, id_tokenizer, read_dataset
from test_trainer import TINY, assert_same_checkpoint

# Source A: 24 images 24 px wide, B: 20 images 16 px wide, each with 1 to 3 captions, shards of 4.
SIZES = {"a": (24, (24, 16)), "b": (20, (16, 24))}


def width_and_id(image):
    """A preprocess that keeps what a test checks: the source (the image's width) and its colour id."""
    return torch.tensor([image.size[0], id_of_image(image)])


@pytest.fixture(scope="module")
def two(module_tmp) -> list[Path]:
    dirs = []
    for name, (count, size) in SIZES.items():
        tmp = module_tmp(name)
        csv, root = captions_table(tmp, count, lambda i: 1 + i % 3, size=size)
        prep_table(input=csv, output=tmp / "data", image_col="filepath", caption_col="title", image_root=root,
                   shard_size=4, workers=1, shuffle=False)  # sample i shows image id i
        dirs.append(tmp / "data")
    return dirs


def loader(sources, batch_size, **kw) -> TrainLoader:
    kw.setdefault("seed", 3)
    return TrainLoader(sources, width_and_id, id_tokenizer, batch_size, **kw)


def global_batches(sources, epoch, world_size, batch_size, start_step=0, **kw) -> list[dict[str, torch.Tensor]]:
    """Step by step, the batches of every rank concatenated in rank order."""
    ranks = [list(loader(sources, batch_size, rank=r, world_size=world_size, **kw).epoch(epoch, start_step))
             for r in range(world_size)]
    return [{k: torch.cat([getattr(ranks[r][s], k) for r in range(world_size)])
             for k in ("images", "tokens", "image_index", "text_index")} for s in range(len(ranks[0]))]


def offsets(dirs) -> tuple[list[int], list[int]]:
    manifests = [json.loads((d / "manifest.json").read_text()) for d in dirs]
    images = np.cumsum([0] + [m["num_images"] for m in manifests])[:-1].tolist()
    texts = np.cumsum([0] + [m["num_texts"] for m in manifests])[:-1].tolist()
    return images, texts


def check_pairs(dirs, batch: dict[str, torch.Tensor]) -> None:
    """Every row's global image and caption indices are its source's own plus the source's offsets."""
    image_offsets, text_offsets = offsets(dirs)
    widths = [size[0] for _, size in SIZES.values()]
    captions = [{(s["meta"]["image_index"], j): t for s in read_dataset(d)
                 for j, t in enumerate(s["meta"]["text_index"])} for d in dirs]
    for (width, image_id), (token_id, j), g_image, g_text in zip(
            batch["images"].tolist(), batch["tokens"].tolist(), batch["image_index"].tolist(),
            batch["text_index"].tolist()):
        k = widths.index(width)
        assert image_id == token_id == g_image - image_offsets[k]
        assert g_text == captions[k][(image_id, j)] + text_offsets[k]


def test_every_sample_of_both_sources_once_per_epoch_with_global_indices(two):
    """At 2 processes with 2 workers each: the 44 samples of both sources exactly once (44 = 11 global batches
    of 4), each under its source's offset, and the same global batches as 1 process with 1 worker."""
    batches = global_batches(two, 0, world_size=2, batch_size=2, workers=2, lanes=4)
    seen = torch.cat([b["image_index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(24 + 20))
    for batch in batches:
        check_pairs(two, batch)
    single = global_batches(two, 0, world_size=1, batch_size=4, workers=1, lanes=4)
    for a, b in zip(batches, single, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Sources' shards are interleaved by the epoch's permutation, not read one source after the other.
    first_half = seen[:22]
    assert (first_half < 24).any() and (first_half >= 24).any()


def test_weighted_virtual_epoch(two):
    """Weights 1:3 over a virtual epoch of 40: exactly 10 samples of A and 30 of B (drawn with replacement),
    from (seed, epoch) alone: the same at 1 and 2 processes, another draw the next epoch, and a resume at
    step 4 gives the remaining steps."""
    kw = {"weights": [1.0, 3.0], "samples_per_epoch": 40, "lanes": 4}
    batches = global_batches(two, 0, world_size=2, batch_size=2, workers=2, **kw)
    assert len(batches) == 10
    seen = torch.cat([b["image_index"] for b in batches])
    assert int((seen < 24).sum()) == 10 and int((seen >= 24).sum()) == 30
    for batch in batches:
        check_pairs(two, batch)
    single = global_batches(two, 0, world_size=1, batch_size=4, workers=1, **kw)
    for a, b in zip(batches, single, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = global_batches(two, 0, world_size=2, batch_size=2, start_step=4, workers=1, **kw)
    for a, b in zip(batches[4:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    later = torch.cat([b["image_index"] for b in global_batches(two, 1, world_size=1, batch_size=4, **kw)])
    assert not torch.equal(seen, later)


def test_weighted_shares_follow_the_weights_and_each_sample_is_equally_likely():
    """The drawn samples of a source are as likely each (shards of unequal size drawn uniformly, whole), and
    a source's share is exact: checked over many epochs against the expected counts."""
    sizes = [np.array([5, 1, 3]), np.array([4, 4])]
    counts = np.zeros(9 + 8)
    for epoch in range(400):
        plan = plan_resampled_epoch(sizes, [0, 3], [2.0, 1.0], 60, 2, 5, seed=1, epoch=epoch)
        visit_sizes = np.diff(plan.offsets)
        per_source = [int(visit_sizes[plan.order < 3].sum()), int(visit_sizes[plan.order >= 3].sum())]
        assert per_source == [40, 20] and plan.steps == 6
        starts = np.array([0, 5, 6, 9, 13])
        for shard, size in zip(plan.order.tolist(), visit_sizes.tolist()):
            counts[starts[shard]:starts[shard] + size] += 1
    a, b = counts[:9], counts[9:]
    # Expected per sample: 40 / 9 and 20 / 8 per epoch, less for the truncated last visits (a few percent).
    assert np.allclose(a / 400, 40 / 9, rtol=0.12) and np.allclose(b / 400, 20 / 8, rtol=0.12)


# ---------------------------------------------------------------------------------------------- on the CLI


def cli_args(dirs, out, **extra) -> list[str]:
    settings = {"data.train": "[" + ",".join(map(str, dirs)) + "]", "data.batch_size": 16, "data.workers": 1,
                "data.lanes": 4, "train.warmup_steps": 2, "train.log_every": 1, "train.output_dir": out,
                "eval.retrieval": "[]", "eval.zeroshot": "[]", "loss.tau_warmup_steps": 0, "loss.tau_min": 0.01,
                "loss.tau_init": 0.05, **extra}
    return ["train", "--config", str(TINY)] + [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def synthetic(module_tmp) -> list[Path]:
    """Two synthetic sets (96 and 64 samples, 6 and 4 shards), both recording concepts, and a third (32) that
    no run trains on."""
    root = module_tmp("synthetic_sources")
    for name, count, seed in (("a", 96, 1), ("b", 64, 2), ("c", 32, 3)):
        prep_synthetic(output=root / name, num_train=count, seed=seed, workers=1)
    return [root / "a/train", root / "b/train", root / "c/train"]


@pytest.fixture(scope="module")
def two_source_run(synthetic, module_tmp) -> Path:
    """One epoch (160 samples = 10 global batches of 16) over both sources, on 2 processes."""
    out = module_tmp("two_sources") / "run"
    done = launch.run(cli_args(synthetic[:2], out, **{"data.batch_size": 8, "train.epochs": 1,
                                                      "train.checkpoint_every": 5}), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_source_run_layout_state_and_temperatures(synthetic, two_source_run):
    synthetic = synthetic[:2]
    final = two_source_run / "final"
    manifests = [json.loads((d / "manifest.json").read_text()) for d in synthetic]
    state = TrainerState.read(final)
    image_offsets, text_offsets = offsets(synthetic)
    assert [s["image_offset"] for s in state.sources] == image_offsets == [0, manifests[0]["num_images"]]
    assert [s["text_offset"] for s in state.sources] == text_offsets
    assert [s["dataset_id"] for s in state.sources] == [m["dataset_id"] for m in manifests]
    num_images, num_texts = (sum(m[k] for m in manifests) for k in ("num_images", "num_texts"))
    assert (state.num_images, state.num_texts, state.global_step) == (num_images, num_texts, 10)
    loss_state = read_loss_state(final)
    assert loss_state["img.tau"].numel() == num_images and loss_state["txt.tau"].numel() == num_texts
    # 10 steps x 16 = 160 = every sample once: every image of both sources was visited.
    assert num_images == 160 and bool(loss_state["img.visited"].all())
    # temperatures.csv names each row's source and its index there
    csv = pd.read_csv(final / "temperatures.csv")
    for side, starts in (("image", image_offsets), ("text", text_offsets)):
        rows = csv[csv.side == side]
        source = (rows["index"] >= starts[1]).astype(int)
        assert rows["source"].tolist() == source.tolist()
        assert (rows["source_index"] == rows["index"] - np.array(starts)[source]).all()
    pd.testing.assert_frame_equal(read_temperatures(final).sort_values(["side", "index"]).reset_index(drop=True),
                                  read_temperatures(final / "temperatures.csv"), check_dtype=False)
    # the temperature analysis joins both sources' concepts on the global indices
    summary = analyze_temperatures(final, [str(d) for d in synthetic], two_source_run / "analysis")
    assert summary["concept_frequency"] is not None
    per_concept = pd.read_csv(two_source_run / "analysis/per_concept.csv")
    assert per_concept["num_image"].sum() == num_images


@pytest.mark.slow
def test_weighted_run_same_at_one_and_two_processes_and_on_resume(synthetic, tmp_path):
    synthetic = synthetic[:2]
    """Weights 1:3, virtual epochs of 48 samples (3 steps), 6 steps: one process, two processes and a resume
    from step 3 train the same run."""
    weighted = {"data.weights": "[1,3]", "data.samples_per_epoch": 48, "train.max_steps": 6,
                "train.checkpoint_every": 3}
    one = launch.run(cli_args(synthetic, tmp_path / "one", **weighted))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch.run(cli_args(synthetic, tmp_path / "two", **weighted, **{"data.batch_size": 8}), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    resumed = launch.run(cli_args(synthetic, tmp_path / "resumed", **weighted,
                                  **{"train.resume": tmp_path / "one/checkpoints/step-3"}))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_checkpoint(tmp_path / "one/final", tmp_path / "resumed/final")
    assert_same_checkpoint(tmp_path / "one/final", tmp_path / "two/final", weights_atol=1e-4, state_atol=2e-5)
    # 2 epochs x 48 draws: 24 of source A (96 images), 72 of B, drawn as whole shards with replacement
    visited = read_loss_state(tmp_path / "one/final")["img.visited"]
    assert 0 < int(visited[:96].sum()) <= 24 and 0 < int(visited[96:].sum()) <= 72


@pytest.mark.slow
@pytest.mark.parametrize("order, why", [
    ([1, 0], "the same sources in another order"),
    ([0], "sources removed"),
    ([0, 1, 2], "sources added"),
])
def test_resume_refuses_other_sources(synthetic, two_source_run, tmp_path, capsys, order, why):
    code = main(cli_args([synthetic[k] for k in order], tmp_path / "r", **{
        "data.batch_size": 16, "train.resume": two_source_run / "checkpoints/step-5"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("clip-dro train: error: checkpoint"), err
    assert why in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "r/checkpoints").exists()


@pytest.mark.parametrize("extra, message", [
    ({"data.weights": "[1]"}, "data.weights: [1.0] has 1 entries but data.train has 2 sources"),
    ({"data.weights": "[1,0]", "data.samples_per_epoch": 32}, "data.weights[1]: 0.0 must be > 0"),
    ({"data.weights": "[1,-2]", "data.samples_per_epoch": 32}, "data.weights[1]: -2.0 must be > 0"),
    ({"data.weights": "[1,2]"}, "data.samples_per_epoch: not set; data.weights needs it"),
    ({"data.samples_per_epoch": 32}, "data.samples_per_epoch: 32 is only used with data.weights"),
    ({"data.weights": "[1,2]", "data.samples_per_epoch": 8}, "data.samples_per_epoch: 8 must be at least the global"),
    ({"data.train": "[]"}, "data.train: [] is empty"),
    ({"model.lock_image": "true", "model.lock_text": "true", "data.feature_cache": "dataset"},
     "data.feature_cache: 'dataset' reads a single source"),
])
def test_config_errors_name_the_key(two, tmp_path, capsys, extra, message):
    code = main(cli_args(two, tmp_path / "r", **extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"clip-dro train: error: {err[0].split('error: ', 1)[1]}"] and message in err[0], err


def test_duplicate_source_is_an_error(two, tmp_path, capsys):
    code = main(cli_args([two[0], two[1], Path(str(two[0]) + "/")], tmp_path / "r"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.train[2]" in err[0] and "same source as data.train[0]" in err[0]


def test_samples_per_epoch_below_the_global_batch_of_the_processes(two):
    """Per process it fits, over 2 processes it does not: the loader names the key."""
    with pytest.raises(Exception, match=r"data.samples_per_epoch: 6 is fewer than the global batch of 8"):
        loader(two, 4, world_size=2, lanes=2, weights=[1.0, 1.0], samples_per_epoch=6)


def test_single_string_and_old_checkpoints_stay_valid(two, tmp_path):
    """data.train as one string is a list of one; a trainer_state.json without ``sources`` (written before
    several sources) reads as its one source at offset 0."""
    from clip_dro.config import load_config

    assert load_config(TINY, [f"data.train={two[0]}"]).data.train == [str(two[0])]
    state = {"global_step": 3, "epoch": 0, "step_in_epoch": 3, "dataset_id": "abc", "num_images": 5, "num_texts": 7,
             "model_name": "tiny-vit", "loss_name": "isogclr", "scheduler": {}, "global_batch": 16, "lanes": 2}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    read = TrainerState.read(tmp_path)
    assert read.sources is None and read.recorded_sources() == [
        {"dataset_id": "abc", "num_images": 5, "num_texts": 7, "image_offset": 0, "text_offset": 0}]


def test_readme_example_is_a_valid_config(tmp_path):
    """The README's data section shows a multi-source config; it loads as written."""
    import re

    import yaml

    from clip_dro.config import load_config

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", readme, flags=re.S | re.M) if "samples_per_epoch" in b]
    (tmp_path / "sources.yaml").write_text(block)
    data = load_config(tmp_path / "sources.yaml").data
    assert data.train == yaml.safe_load(block)["data"]["train"] and data.weights == [1.0, 3.0]
    assert data.samples_per_epoch == 4_000_000
