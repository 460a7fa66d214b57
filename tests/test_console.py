"""A quiet console (clip_dro.console): third-party load reports and expected warnings go to the log file or
nowhere, never the user's terminal; what third-party libraries say that is not expected still gets through."""
from __future__ import annotations

import re
import tarfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clip_dro.bench import launch
from clip_dro.manifest import load_manifest

# What the terminal showed before: transformers' load report and weight-loading bar, open_clip's root-logger
# warnings (basicConfig's "WARNING:root:" format), PIL's DecompressionBombWarning with its source line.
THIRD_PARTY = re.compile(r"LOAD REPORT|\[transformers\]|Loading weights|initialized partially|initialized randomly"
                         r"|DecompressionBomb|^WARNING:|site-packages/.*Warning", re.MULTILINE)


def third_party_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if THIRD_PARTY.search(line)]


@pytest.mark.slow
def test_quickstart_stderr_holds_only_our_progress(tmp_path):
    proc = launch.run(["quickstart", "--output", str(tmp_path), "--steps", "2", "--num-train", "480", "--seeds", "1"],
                      timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert third_party_lines(proc.stderr) == []
    assert "| zeroshot/acc1 | isogclr |" in proc.stdout
    # The records were routed, not lost: the pretrained towers' reports are in the run's log file.
    log = (tmp_path / "quickstart.log").read_text()
    assert log.count("LOAD REPORT") == 3 and "pooler.dense.weight | UNEXPECTED" in log
    assert "Model efficientnet-lite0-minilm initialized partially." in log


@pytest.mark.slow
def test_prep_accepts_a_huge_image_without_a_warning(tmp_path):
    """12000 × 12000 = 144 megapixels: above PIL's MAX_IMAGE_PIXELS (89 M), which warns, and below twice it,
    which would raise; prep accepts the image and shrinks it."""
    assert Image.MAX_IMAGE_PIXELS < 12000 * 12000 < 2 * Image.MAX_IMAGE_PIXELS
    images = tmp_path / "images"
    images.mkdir()
    huge = Image.new("L", (12000, 12000), 255)  # blank: a PNG of a few hundred kB
    huge.paste(0, (5000, 5000, 7000, 7000))
    huge.save(images / "huge.png")
    del huge
    Image.new("RGB", (80, 60), (200, 30, 30)).save(images / "small.png")
    pd.DataFrame({"image": ["huge.png", "small.png"], "caption": ["a black square", "a red patch"]}).to_csv(
        tmp_path / "pairs.csv", index=False)
    out = tmp_path / "out"
    proc = launch.run(["prep", "csv", "--input", str(tmp_path / "pairs.csv"), "--image-root", str(images),
                       "--image-col", "image", "--caption-col", "caption", "--output", str(out),
                       "--image-size", "64", "--workers", "1"])
    assert proc.returncode == 0, proc.stderr
    assert third_party_lines(proc.stderr) == []
    manifest = load_manifest(out)
    assert (manifest.accepted, manifest.rejected) == (2, 0)
    sizes = {}
    for shard in manifest.shards:
        with tarfile.open(out / shard.name) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".jpg", ".png")):
                    with Image.open(tar.extractfile(member)) as image:
                        sizes[member.name] = image.size
    assert sorted(sizes.values()) == [(64, 64), (80, 60)]


ROUTING = textwrap.dedent("""
    import logging, sys, warnings
    from pathlib import Path

    import open_clip
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    sys.path.insert(0, sys.argv[2])
    from hf_tower import write_tiny_bert
    from clip_dro import console
    from clip_dro.models import register_model_configs

    root = Path(sys.argv[1])
    extra, missing = write_tiny_bert(root / "extra"), write_tiny_bert(root / "missing")
    weights = load_file(extra / "model.safetensors")
    save_file({**weights, "head.weight": torch.zeros(2)}, extra / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "pooler.dense.bias"}, missing / "model.safetensors")

    console.install()
    console.route_transformers()
    register_model_configs()
    with console.log_to(root / "run.log"):
        AutoModel.from_pretrained(extra)                # UNEXPECTED only: expected
        AutoModel.from_pretrained(missing)              # MISSING: the user must see it
        open_clip.create_model("tiny-vit")              # "initialized randomly": expected
        logging.getLogger("accelerate.state").warning("a third-party warning")
        logging.getLogger("clip_dro.train").warning("our own warning")
    logging.getLogger("accelerate.state").warning("after the block")
""")


def test_routing_keeps_real_problems_on_the_terminal(tmp_path):
    proc = launch.run([str(tmp_path), str(Path(__file__).parent)], entry=["-c", ROUTING], timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert err.count("LOAD REPORT") == 1 and "pooler.dense.bias" in err and "head.weight" not in err
    assert "initialized randomly" not in err
    assert "WARNING:accelerate.state:a third-party warning" in err
    assert "\nour own warning\n" in f"\n{err}" and "WARNING:clip_dro" not in err
    assert "WARNING:accelerate.state:after the block" in err
    log = (tmp_path / "run.log").read_text()
    assert log.count("LOAD REPORT") == 2 and "head.weight" in log and "pooler.dense.bias" in log
    assert "model 'tiny-vit'. Model initialized randomly." in log and "a third-party warning" in log
    assert "\x1b[" not in log  # transformers' terminal styling stays out of the file
    assert "our own warning" not in log and "after the block" not in log
