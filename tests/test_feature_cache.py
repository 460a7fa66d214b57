"""The feature cache (data.feature_cache): its batches are the loader's, training from it equals training
through the locked towers, a foreign or damaged cache is refused in one line, an incomplete one rebuilt, and
2 processes build and train as one does."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed

import clip_dro.trainer
from clip_dro.bench import launch
from clip_dro.config import ConfigError, load_config
from clip_dro.data.train_loader import TrainLoader
from clip_dro.feature_cache import (CachedBatches, FeatureCacheError, cache_dir, cache_key, cached_training,
                                    tower_features)
from clip_dro.models import build_model
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import train

TINY = CONFIGS_DIR / "tiny_cpu.yaml"
LOCKED = {"model.lock_image": "true", "model.lock_text": "true"}


def overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {"data.train": data / "train", "data.batch_size": 16, "data.workers": 1, "data.lanes": 2,
            "train.max_steps": 5, "train.warmup_steps": 1, "train.log_every": 1, "train.lr": 1e-2,
            "train.output_dir": out, "eval.retrieval": "[]", "eval.zeroshot": "[]", "loss.tau_warmup_steps": 0,
            **LOCKED, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def locked_tiny():
    set_seed(0)  # the trainer's seed, so its initial weights
    return build_model("tiny-vit", lock_image=True, lock_text=True)


def build_cache(data: Path, root: Path, seed: int = 0):
    bundle = locked_tiny()
    loader = TrainLoader(data / "train", bundle.preprocess_eval, bundle.tokenizer, 16, seed=seed, workers=1,
                         lanes=2)
    heads, batches = cached_training(str(root), "tiny-vit", bundle.model, loader, bundle.preprocess_eval,
                                     torch.device("cpu"), 16)
    return bundle, loader, heads, batches


def test_cached_batches_are_the_loaders_batches_with_the_towers_features(data, tmp_path):
    """Step for step the same samples and drawn captions as the loader (eval transform, a worker, resumed at
    step 2, epoch 1), and the rows are what the locked towers compute from the loader's images and tokens."""
    bundle, loader, _, batches = build_cache(data, tmp_path / "cache")
    for epoch, start in ((0, 0), (1, 2)):
        for step, (ours, theirs) in enumerate(zip(batches.epoch(epoch, start), loader.epoch(epoch, start))):
            assert torch.equal(ours.image_index, theirs.image_index) and torch.equal(ours.text_index, theirs.text_index)
            if step < 2:
                image, text = tower_features(bundle.model, theirs.images, theirs.tokens)
                torch.testing.assert_close(ours.images, image, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(ours.tokens, text, rtol=1e-5, atol=1e-5)
        assert step + 1 == loader.steps_in_epoch(epoch) - start


def _through_towers_with_the_eval_transform(monkeypatch):
    """The trainer's model with its eval transform for training too: the cache's features come from it."""
    def build(**keys):
        bundle = build_model(**keys)
        return dataclasses.replace(bundle, preprocess_train=bundle.preprocess_eval)

    monkeypatch.setattr(clip_dro.trainer, "build_model", build)


@pytest.mark.parametrize("loss", ["clip", "isogclr"])
def test_training_from_the_cache_equals_training_through_the_locked_towers(data, tmp_path, monkeypatch, loss):
    cached = train(load_config(TINY, overrides(data, tmp_path / "cached", **{
        "loss.name": loss, "data.feature_cache": tmp_path / "cache"})))
    with monkeypatch.context() as patch:
        _through_towers_with_the_eval_transform(patch)
        towers = train(load_config(TINY, overrides(data, tmp_path / "towers", **{"loss.name": loss})))
    a, b = torch.load(cached / "model.pt"), torch.load(towers / "model.pt")
    initial = locked_tiny().model.state_dict()
    for key in a:
        if key in ("visual.proj", "text_projection"):
            assert not torch.equal(a[key], initial[key]), f"{key} did not train"
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
        elif key != "logit_scale":
            assert torch.equal(a[key], initial[key]) and torch.equal(b[key], initial[key]), key


def test_cache_is_reused_across_runs_and_losses(data, tmp_path, capsys):
    for loss in ("clip", "sogclr"):
        train(load_config(TINY, overrides(data, tmp_path / loss, **{
            "loss.name": loss, "data.feature_cache": tmp_path / "cache", "train.max_steps": 1})))
    out = capsys.readouterr().out
    assert out.count("feature cache: computing") == 1
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_foreign_and_damaged_caches_are_refused_incomplete_rebuilt(data, tmp_path, capsys):
    bundle, loader, _, _ = build_cache(data, tmp_path / "cache")
    key = cache_key("tiny-vit", bundle.model, bundle.preprocess_eval, bundle.tokenizer, loader.manifest)
    directory = cache_dir(tmp_path / "cache", key)
    good = tmp_path / "good"
    shutil.copytree(directory, good)

    meta = json.loads((directory / "meta.json").read_text())
    meta["key"]["weights_sha256"] = "0" * 64  # another model's features copied in under this name
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FeatureCacheError, match=r"holds features of another weights_sha256 .*delete the directory"):
        build_cache(data, tmp_path / "cache")

    shutil.rmtree(directory)
    shutil.copytree(good, directory)
    rows = np.load(directory / "image.npy")
    np.save(directory / "image.npy", rows[:-3])
    with pytest.raises(FeatureCacheError, match=r"has \d+ rows in image.npy, the dataset \d+"):
        build_cache(data, tmp_path / "cache")
    (directory / "text.npy").write_bytes(b"truncated")
    with pytest.raises(FeatureCacheError, match=r"cannot be read"):
        build_cache(data, tmp_path / "cache")

    meta["key"] = key
    meta["complete"] = False  # a build that was killed
    (directory / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    _, _, _, batches = build_cache(data, tmp_path / "cache")
    assert "feature cache: computing" in capsys.readouterr().out
    np.testing.assert_array_equal(batches.cache.image, np.load(good / "image.npy"))
    np.testing.assert_array_equal(batches.cache.text, np.load(good / "text.npy"))


def test_cache_needs_both_towers_locked_entirely(tmp_path):
    with pytest.raises(ConfigError, match="data.feature_cache: .* needs both towers locked entirely"):
        load_config(TINY, ["data.feature_cache=dataset", "model.lock_image=true"])
    with pytest.raises(ConfigError, match="data.feature_cache"):
        load_config(TINY, ["data.feature_cache=dataset", *[f"{k}={v}" for k, v in LOCKED.items()],
                           "model.lock_image_unlocked_groups=1"])
    assert load_config(TINY, ["data.feature_cache=dataset", *[f"{k}={v}" for k, v in LOCKED.items()]])


def test_remote_dataset_needs_a_cache_directory():
    from clip_dro.feature_cache import cache_root

    with pytest.raises(FeatureCacheError, match="data.feature_cache: data.train https://host/train is remote"):
        cache_root("dataset", "https://host/train")
    assert cache_root("dataset", "data/train") == Path("data/train/feature_cache")


@pytest.mark.slow
def test_two_processes_build_the_cache_and_train_as_one(data, tmp_path):
    """2 processes each build their shards' rows (one cache, built by both), then train as 1 process with the
    double batch; the second run of each reuses the cache."""
    copy = tmp_path / "data"
    shutil.copytree(data / "train", copy / "train")
    common = ["train", "--config", str(TINY)]
    two = launch.run(common + overrides(copy, tmp_path / "two", **{"data.batch_size": 8,
                                                                  "data.feature_cache": "dataset"}), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "feature cache: computing" in two.stdout + two.stderr
    one = launch.run(common + overrides(copy, tmp_path / "one", **{"data.feature_cache": "dataset"}))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "feature cache: computing" not in one.stdout + one.stderr
    a, b = torch.load(tmp_path / "one/final/model.pt"), torch.load(tmp_path / "two/final/model.pt")
    for key in ("visual.proj", "text_projection"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)
