import pytest
import torch

from clip_dro.models import ModelError, build_model, list_models
from hf_tower import write_tiny_bert


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


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "no-such-model"}, "model.name: unknown model 'no-such-model'"),
    ({"name": "tiny-vit", "pretrained": "openai"}, "model.pretrained: 'openai' is not a local file"),
    ({"name": "tiny-vit-hftext"}, "set model.text_tower"),
    ({"name": "tiny-vit", "text_tower": "/x"}, "has its own text tower"),
    ({"name": "tiny-vit-hftext", "text_tower": "/nonexistent"}, "not a local Hugging Face model directory"),
])
def test_model_errors(kwargs, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_model(**kwargs)
