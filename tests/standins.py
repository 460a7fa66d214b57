"""Stand-ins for the paper's pretrained weight files, written to a directory as a user's download would be:
a torchvision ResNet-50 state dict and a DistilBERT model directory (config, weights, tokenizer).

Their weights are random: they prove that a file lands where it belongs, not what ImageNet taught. Every
tensor is made distinct (small noise on BatchNorm's ones and zeros, distinct BatchNorm step counters), so
that a value found in the model can only have come from one tensor of the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hf_tower import WORDS


def _make_distinct(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, tensor in enumerate(module.state_dict().values()):
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.fill_(i)


def write_resnet50_state_dict(path: Path, seed: int = 0) -> Path:
    """A randomly initialized torchvision ResNet-50 saved like torchvision's IMAGENET1K_V1 ``.pth``."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    _make_distinct(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_tiny_distilbert(directory: Path, seed: int = 0) -> Path:
    """A tiny randomly initialized DistilBERT with its WordPiece tokenizer, saved with ``save_pretrained``."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores a vocab_file= argument; a vocab.txt in the directory is what from_pretrained reads.
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    DistilBertTokenizer.from_pretrained(directory, model_max_length=64).save_pretrained(directory)
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(WORDS), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, pad_token_id=WORDS.index("[PAD]"))
    model = DistilBertModel(config)
    _make_distinct(model, seed)
    model.save_pretrained(directory)
    return directory


def paper_setup_overrides(tmp_dir: Path) -> list[str]:
    """Write stand-ins for the weights ``configs/cc3m_isogclr.yaml`` expects; return the ``key=value``
    overrides that point the config's model keys at them."""
    image = write_resnet50_state_dict(Path(tmp_dir) / "resnet50-imagenet.pth")
    text = write_tiny_distilbert(Path(tmp_dir) / "distilbert-base-uncased")
    return [f"model.pretrained_image={image}", f"model.text_tower={text}"]
