"""Transparent images (RGBA, LA, palette with a transparent index) are composited onto a background (white
by default, configurable) in prep, in the training loader and in evaluation: dark line art on a transparent
background stays dark lines on white, where a plain convert("RGB") makes a black square."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from torchvision.transforms.functional import to_tensor

from clip_dro.data.eval_sets import ImageRef, decode_image, image_batches
from clip_dro.data.train_loader import TrainLoader
from data_prep.tabular import prep_table
from datagen import id_tokenizer, read_dataset
from evalgen import write_shards

SIZE = 32
LINE = (20, 20, 20)


def line_art(mode: str) -> Image.Image:
    """A dark cross, 4 px wide, on a fully transparent (black) background, in ``mode``."""
    rgba = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    pixels = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    pixels[14:18, :] = (*LINE, 255)
    pixels[:, 14:18] = (*LINE, 255)
    rgba = Image.fromarray(pixels, "RGBA")
    if mode == "RGBA":
        return rgba
    if mode == "LA":
        return rgba.convert("LA")
    palette = Image.new("P", (SIZE, SIZE), 0)  # index 0 transparent, index 1 the line colour
    palette.putpalette([0, 0, 0, *LINE] + [0] * 762)
    palette.paste(1, mask=Image.fromarray(pixels[:, :, 3]))
    palette.info["transparency"] = 0
    return palette


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"transparency": 0} if image.mode == "P" else {}))
    return out.getvalue()


def assert_line_art_on(rgb: np.ndarray, background) -> None:
    """``rgb`` (H, W, 3 in 0..255): the corners show ``background``, the cross is dark."""
    for y, x in [(0, 0), (0, SIZE - 1), (SIZE - 1, 0), (5, 27)]:
        assert np.abs(rgb[y, x] - np.array(background)).max() <= 8, (rgb[y, x], background)
    assert rgb[16, 3].max() <= 60 and rgb[3, 16].max() <= 60


CASES = [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "WEBP"), ("P", "GIF")]


@pytest.mark.parametrize("mode, fmt", CASES)
def test_a_plain_rgb_conversion_makes_a_black_square(mode, fmt):
    """What this file guards against (so its assertions can fail)."""
    naive = np.asarray(Image.open(io.BytesIO(encoded(line_art(mode), fmt))).convert("RGB"), dtype=float)
    assert naive[0, 0].max() <= 8 and naive[16, 3].max() <= 60


def _table(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for i, (mode, fmt) in enumerate(CASES):
        name = f"art{i}.{fmt.lower()}"
        (root / name).write_bytes(encoded(line_art(mode), fmt))
        rows.append((name, f"item {i} caption 0"))
    csv = tmp_path / "t.csv"
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(csv, index=False)
    return csv


@pytest.mark.parametrize("background, rgb", [(None, (255, 255, 255)), ("#00ff00", (0, 255, 0)),
                                             ("0,0,255", (0, 0, 255))])
def test_prep_composites_onto_the_background(tmp_path, background, rgb):
    csv = _table(tmp_path)
    kw = {} if background is None else {"background": background}
    manifest = prep_table(input=csv, output=tmp_path / "out", image_col="filepath", caption_col="title",
                          image_root=tmp_path / "images", shard_size=8, workers=2, shuffle=False, **kw)
    assert manifest.source["background"] == list(rgb) and manifest.rejected == 0
    samples = read_dataset(tmp_path / "out")
    assert [s["ext"] for s in samples] == ["png", "png", "png", "jpg", "jpg"]  # PNG stays lossless
    for s in samples:
        assert s["image"].mode == "RGB"
        assert_line_art_on(np.asarray(s["image"], dtype=float), rgb)


def test_prep_refuses_a_colour_it_cannot_read(tmp_path):
    from clip_dro.errors import UserError

    with pytest.raises(UserError, match="--background: 'transparent-ish' is not a colour"):
        prep_table(input=_table(tmp_path), output=tmp_path / "out", image_col="filepath", caption_col="title",
                   image_root=tmp_path / "images", background="transparent-ish")
    assert not (tmp_path / "out").exists()


def _raw_shards(directory: Path) -> None:
    """Shards holding the transparent images as they are (written by another tool, not by prep)."""
    samples = [{"png" if fmt != "WEBP" else "webp": encoded(line_art(mode), fmt if fmt != "GIF" else "PNG"),
                "txt": f"item {i} caption 0", "json": {"index": i, "image_index": i, "text_index": [i]}}
               for i, (mode, fmt) in enumerate(CASES[:4])]
    write_shards(directory, samples, 2, "train", num_texts=4)


@pytest.mark.parametrize("background, rgb", [("white", (255, 255, 255)), ("#0000ff", (0, 0, 255))])
def test_training_loader_composites_onto_the_background(tmp_path, background, rgb):
    _raw_shards(tmp_path / "raw")
    loader = TrainLoader(tmp_path / "raw", to_tensor, id_tokenizer, 2, seed=0, lanes=2, workers=1,
                         background=background)
    images = [x for batch in loader.epoch(0) for x in batch.images]
    assert len(images) == 4
    for x in images:
        assert_line_art_on(x.permute(1, 2, 0).numpy() * 255, rgb)


def test_evaluation_decode_composites_onto_white(tmp_path):
    refs = []
    for i, (mode, fmt) in enumerate(CASES):
        path = tmp_path / f"art{i}.{fmt.lower()}"
        path.write_bytes(encoded(line_art(mode), fmt))
        refs.append(ImageRef(str(path), path))
        assert_line_art_on(np.asarray(decode_image(refs[-1]), dtype=float), (255, 255, 255))
    (batch,) = list(image_batches(refs, to_tensor, batch_size=8, workers=1))
    assert not batch.bad and batch.images.shape == (5, 3, SIZE, SIZE)
    assert float(batch.images[:, :, 0, 0].min()) >= 0.97
