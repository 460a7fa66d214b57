"""Every shipped config starts: at the process counts it is meant for (the loader's rank arithmetic at 8 and
32 processes, simulated), at 1 and 2 real processes on stand-in data, and with its own model built on the CPU.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from clip_dro.bench import launch
from clip_dro.config import ModelConfig, load_config
from clip_dro.data.train_loader import TrainLoader, check_layout
from clip_dro.resources import CONFIGS_DIR, shipped_configs
from data_prep.tabular import prep_table
from datagen import captions_table, id_tokenizer
from evalgen import make_imagefolder, make_retrieval_set
from torchvision.transforms.functional import to_tensor

ROOT = Path(__file__).resolve().parent.parent
# The process counts each config is written for (its header comment says so).
MEANT_FOR = {"tiny_cpu": (1, 2), "pretrained_cpu": (1, 2), "locked_cpu": (1, 2), "cc3m_isogclr": (1, 8, 32),
             "rn50_isogclr": (1, 8, 32), "vit_b32_isogclr": (1, 8, 32)}
CC3M_SHARDS = 2_900  # CC3M prepped at the default 1000 samples per shard
GPU_CONFIGS = [name for name, counts in MEANT_FOR.items() if max(counts) > 2]


def test_every_shipped_config_is_listed():
    assert sorted(MEANT_FOR) == shipped_configs()


@pytest.mark.parametrize("name", sorted(MEANT_FOR))
def test_layout_holds_at_the_process_counts_each_config_is_meant_for(name):
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml")
    for processes in MEANT_FOR[name]:
        lanes = check_layout("cc3m", CC3M_SHARDS, cfg.data.batch_size, processes, cfg.data.workers, cfg.data.lanes)
        assert lanes % processes == 0 and (cfg.data.batch_size * processes) % lanes == 0


@pytest.fixture(scope="module")
def standin(module_tmp):
    """CC3M in miniature: 640 images in 80 shards (more than the GPU configs' 64 lanes), plus small
    retrieval and zero-shot sets."""
    root = module_tmp("standin")
    table, images = captions_table(root, 640, 1)
    prep_table(input=table, output=root / "train", image_col="filepath", caption_col="title", image_root=images,
               shard_size=8, workers=1)
    make_retrieval_set(root / "retrieval", num_images=12)
    make_imagefolder(root / "zeroshot", ["a", "b", "c"], per_class=3, classnames=["apple", "bus", "cat"])
    return root


def rank_batches(data, world_size: int, global_batch: int, workers: int, lanes: int, epoch: int = 0):
    """Each rank's first batch, read in one process as that rank would."""
    out = []
    for rank in range(world_size):
        loader = TrainLoader(data, to_tensor, id_tokenizer, global_batch // world_size, seed=0, rank=rank,
                             world_size=world_size, workers=workers, lanes=lanes)
        out.append(next(iter(loader.epoch(epoch))))
    return out


@pytest.mark.parametrize("name", GPU_CONFIGS)
@pytest.mark.parametrize("world_size", [8, 32])
def test_simulated_ranks_read_the_global_batch_of_one_process(standin, name, world_size):
    """At 8 and 32 processes the ranks' batches, in rank order, are the one-process global batch; the
    config's workers split each rank's lanes without gaps or overlaps."""
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml")
    lanes, global_batch = cfg.data.lanes, 512
    whole = rank_batches(standin / "train", 1, global_batch, 0, lanes)[0]
    parts = rank_batches(standin / "train", world_size, global_batch, 0, lanes)
    assert torch.equal(torch.cat([p.image_index for p in parts]), whole.image_index)
    assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
    for rank in range(world_size):
        loader = TrainLoader(standin / "train", to_tensor, id_tokenizer, global_batch // world_size, seed=0,
                             rank=rank, world_size=world_size, workers=cfg.data.workers, lanes=lanes)
        blocks = [loader.worker_lanes(w) for w in range(max(loader.workers, 1))]
        per_rank = lanes // world_size
        assert [lane for block in blocks for lane in block] == list(range(rank * per_rank, (rank + 1) * per_rank))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1 and min(map(len, blocks)) >= 1


def test_config_workers_deliver_the_same_batch_as_none(standin):
    """cc3m_isogclr's 6 workers on a rank of 8 lanes (uneven blocks of 1 and 2 lanes) give the inline batch."""
    cfg = load_config(CONFIGS_DIR / "cc3m_isogclr.yaml")
    inline = rank_batches(standin / "train", 8, 512, 0, cfg.data.lanes)[3]
    loader = TrainLoader(standin / "train", to_tensor, id_tokenizer, 64, seed=0, rank=3, world_size=8,
                         workers=cfg.data.workers, lanes=cfg.data.lanes)
    assert loader.workers == 6
    with_workers = next(iter(loader.epoch(0)))
    assert torch.equal(with_workers.image_index, inline.image_index)
    assert torch.equal(with_workers.images, inline.images)


def start_overrides(name: str, standin, out) -> list[str]:
    """Stand-in data; for the GPU configs the tiny model (their own models are built below), else as is."""
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml")
    extra = [f"data.train={standin / 'train'}", f"eval.retrieval=[{standin / 'retrieval'}]",
             f"eval.zeroshot=[{standin / 'zeroshot'}]", "train.max_steps=2", f"train.output_dir={out}"]
    return extra + (tiny_model_overrides(cfg.to_dict()["model"]) if name in GPU_CONFIGS else [])


def tiny_model_overrides(model: dict) -> list[str]:
    """``model.*`` overrides that put the tiny ViT in place of a config's model (its other keys to defaults,
    but the locks, which the tiny ViT takes as they are, so a locked config keeps its feature cache)."""
    defaults = dataclasses.asdict(ModelConfig())
    changed = {key: defaults[key] for key, value in model.items()
               if key != "name" and not key.startswith("lock_") and value != defaults[key]}
    return ["model.name=tiny-vit"] + [f"model.{key}={yaml.safe_dump(value).splitlines()[0]}"
                                      for key, value in changed.items()]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("name", sorted(MEANT_FOR))
def test_config_starts_and_finishes_on_real_processes(standin, tmp_path, name, processes):
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml")
    overrides = start_overrides(name, standin, tmp_path / "run")
    if cfg.data.batch_size * processes > 512:  # the stand-in's 640 samples: at most one 512-sample batch
        overrides.append(f"data.batch_size={512 // processes}")
    proc = launch.run(["train", "--config", name] + overrides, nproc=processes)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((tmp_path / "run/final/trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["lanes"] == (cfg.data.lanes or processes * max(cfg.data.workers, 1))
    evaluated = [json.loads(x)["dataset"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
                 if "eval" in json.loads(x)]
    assert evaluated == ["retrieval", "zeroshot"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MEANT_FOR))
def test_each_config_builds_its_own_model_on_the_cpu(name, tmp_path):
    """The config's own architecture and towers (the paper's with stand-in weight files of the same
    format), through the factory the trainer uses; one forward pass gives finite embeddings of its width."""
    import open_clip
    from PIL import Image

    from clip_dro.models import build_model
    from standins import paper_setup_overrides

    extra = paper_setup_overrides(tmp_path) if name == "cc3m_isogclr" else []
    cfg = load_config(CONFIGS_DIR / f"{name}.yaml", extra)
    bundle = build_model(**dataclasses.asdict(cfg.model))
    images = torch.stack([bundle.preprocess_eval(Image.new("RGB", (300, 200), colour)) for colour in ("red", "blue")])
    with torch.no_grad():
        image_features, text_features, _ = bundle.model.eval()(images, bundle.tokenizer(["a red square", "a blue disc"]))
    width = open_clip.get_model_config(cfg.model.name)["embed_dim"]
    assert image_features.shape == text_features.shape == (2, width)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    assert not torch.allclose(image_features[0], image_features[1]), "the image tower ignores its input"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/rn50_isogclr.yaml", "configs/vit_b32_isogclr.yaml"])
def test_open_clip_config_trains_a_step_with_its_own_model(standin, tmp_path, config):
    """The config as shipped (its own architecture, precision, loss, workers) trains a step on the CPU and
    evaluates; only the batch and lanes are scaled to the stand-in data."""
    import open_clip

    path = ROOT / config
    cfg = load_config(path)
    proc = launch.run(["train", "--config", str(path), f"data.train={standin / 'train'}", "data.batch_size=4",
                       "data.lanes=2", f"eval.retrieval=[{standin / 'retrieval'}]",
                       f"eval.zeroshot=[{standin / 'zeroshot'}]", "train.max_steps=1",
                       f"train.output_dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = tmp_path / "run/final"
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 1
    trained = torch.load(final / "model.pt")
    model = open_clip.create_model(cfg.model.name, pretrained=str(final / "model.pt"))
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    evaluated = [json.loads(x)["dataset"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
                 if "eval" in json.loads(x)]
    assert evaluated == ["retrieval", "zeroshot"]
