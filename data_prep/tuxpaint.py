"""``clip-dro prep tuxpaint``: the Tux Paint stamps as a small real image–text set (a check on real drawings
and captions, not a benchmark).

Input: the stamps directory of the Debian package ``tuxpaint-stamps-default`` (``/usr/share/tuxpaint/stamps``):
category folders (animals, food, town, ...) holding, at any depth, stamps as PNG or SVG, each with a ``.txt``
whose first line is its English description (``A cow.``) and whose other lines are translations
(``xx.utf8=...``), which are not used. A stamp is one image path without its extension; where a stamp has both
a PNG and an SVG, the PNG (Tux Paint's own rendering of it) is used. ``NAME_mirror`` / ``NAME_flip`` images
beside a stamp ``NAME`` are Tux Paint's variants of it, not stamps: they are counted, not read.

Every stamp is an input row. Rejected before any image work (``rejected.jsonl`` of ``train``): a stamp without
a ``.txt``, with an empty or undecodable first line, or an SVG when no SVG renderer is at hand (cairosvg, the
Python package, or ``rsvg-convert`` from librsvg; ``--svg-renderer none`` leaves SVGs out on purpose). SVGs are
rendered 512 px wide; transparency is composited on white by the writer.

Output:

* ``train``: the stamps not held out (kind ``train``), in a seeded random order. With ``--train-captions
  category`` their captions are not their descriptions but their category in one of a few templates ("a
  drawing of animals."), drawn with ``--seed``: a few dozen distinct captions for hundreds of images, so that
  every batch holds same-category pairs with identical captions (false negatives for a contrastive loss, the
  duplicate-heavy regime). The held-out sets keep the descriptions either way.
* ``retrieval`` (kind ``retrieval``) and ``zeroshot`` (kind ``zeroshot``): the same held-out stamps, a
  ``--held-out-fraction`` of each category (rounded, drawn with ``--seed``), the zero-shot samples labelled
  (``.cls``) with their category; ``classnames.txt`` holds the categories that have usable stamps, made
  readable (``naturalforces`` -> ``natural forces``), ``templates.txt`` a few drawing templates.

Each sample's ``.json`` records ``stamp`` (its path under the stamps directory), ``format``, ``category`` and,
for the temperature analysis, ``concept`` (the category) with ``concept_count`` / ``concept_frequency`` (its
share of the training stamps): the categories are the set's long tail (symbols and animals hold 40 % of the
stamps, medical 6 of them). Every manifest's ``extra`` has the counts: stamps, PNGs and SVGs used, SVGs left
out, variants skipped, stamps without a description.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from clip_dro.manifest import Manifest
from data_prep.images import BadImage, EncodedImage, ImageOptions, encode_bytes, load_file
from data_prep.writer import Candidate, Item, PrepError, Rejection, check_options, shuffled, write_dataset

DEFAULT_STAMPS = Path("/usr/share/tuxpaint/stamps")
IMAGE_SUFFIXES = (".png", ".svg")
VARIANT_SUFFIXES = ("_mirror", "_flip")
RENDERERS = ("cairosvg", "rsvg-convert")
SVG_WIDTH = 512
EVAL_SHARD_SIZE = 256
SPLIT_TAG = 7  # first word of the held-out split's seed sequence
TEMPLATES = ("a drawing of {c}.", "a clip art of {c}.", "a cartoon of {c}.", "an illustration of {c}.",
             "a sticker of {c}.", "a simple drawing of {c}.")
READABLE = {"naturalforces": "natural forces"}
TRAIN_CAPTIONS = ("description", "category")
CATEGORY_CAPTIONS = ("a drawing of {c}.", "a picture of {c}.", "a cartoon of {c}.", "clip art of {c}.")
CAPTION_TAG = 11  # first word of the category captions' seed sequence


@dataclass(frozen=True)
class Stamp:
    key: str  # path under the stamps directory, without extension
    category: str
    image: Path
    description: Optional[str]  # None: rejected, see ``problem``
    problem: Optional[str] = None


def available_renderer(choice: str) -> Optional[str]:
    """The SVG renderer to use: ``choice`` itself (checked), the first one at hand for ``auto``, None for
    ``none`` or when none is at hand."""
    found = {"cairosvg": importlib.util.find_spec("cairosvg") is not None,
             "rsvg-convert": shutil.which("rsvg-convert") is not None}
    if choice == "none":
        return None
    if choice == "auto":
        return next((name for name in RENDERERS if found[name]), None)
    if choice not in found:
        raise PrepError(f"--svg-renderer {choice!r}: must be auto, none or one of {', '.join(RENDERERS)}")
    if not found[choice]:
        raise PrepError(f"--svg-renderer {choice}: not installed (pip install cairosvg, or apt-get install "
                        "librsvg2-bin for rsvg-convert)")
    return choice


def render_svg(arg: tuple[str, str], options: ImageOptions) -> EncodedImage:
    """Loader for an SVG stamp: rendered to PNG, ``SVG_WIDTH`` px wide, then handled as any image."""
    path, renderer = arg
    try:
        if renderer == "cairosvg":
            import cairosvg

            data = cairosvg.svg2png(url=path, output_width=SVG_WIDTH)
        else:
            data = subprocess.run(["rsvg-convert", "-w", str(SVG_WIDTH), path], capture_output=True, check=True,
                                  timeout=60).stdout
    except Exception as exc:  # each renderer raises its own types for a malformed file
        raise BadImage(f"SVG {path} could not be rendered by {renderer} ({type(exc).__name__})") from None
    return encode_bytes(data, options)


def _description(txt: Path) -> tuple[Optional[str], Optional[str]]:
    """(first line, None) or (None, why it cannot be used)."""
    if not txt.is_file():
        return None, "no description (.txt)"
    try:
        first = txt.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return None, f"description {txt.name} is not UTF-8"
    line = " ".join(first[0].split()) if first else ""
    return (line, None) if line else (None, "empty description")


def find_stamps(stamps: Path) -> tuple[list[Stamp], dict[str, int]]:
    """Every stamp under the category folders of ``stamps``, sorted by key; and the counts of what was seen."""
    images: dict[str, dict[str, Path]] = {}
    for category in sorted(p for p in stamps.iterdir() if p.is_dir()):
        for path in sorted(category.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                key = path.relative_to(stamps).with_suffix("").as_posix()
                images.setdefault(key, {})[path.suffix.lower()] = path
    counts = {"png_files": sum(".png" in v for v in images.values()),
              "svg_files": sum(".svg" in v for v in images.values()), "variants": 0}
    found = []
    for key, files in sorted(images.items()):
        if key.endswith(VARIANT_SUFFIXES) and key.rsplit("_", 1)[0] in images:
            counts["variants"] += 1
            continue
        image = files.get(".png", files.get(".svg"))
        description, problem = _description(image.with_suffix(".txt"))
        found.append(Stamp(key, key.split("/", 1)[0], image, description, problem))
    return found, counts


def held_out(stamps: list[Stamp], fraction: float, seed: int) -> set[str]:
    """Keys of the held-out stamps: round(fraction x n) of each category's n usable stamps, seeded."""
    rng = np.random.default_rng([seed, SPLIT_TAG])
    chosen: set[str] = set()
    for category in sorted({s.category for s in stamps}):
        keys = [s.key for s in stamps if s.category == category]
        count = int(math.floor(fraction * len(keys) + 0.5))
        chosen.update(keys[i] for i in rng.permutation(len(keys))[:count])
    return chosen


def readable(category: str) -> str:
    return READABLE.get(category, category.replace("_", " ").replace("-", " "))


def category_captions(stamps: list[Stamp], seed: int) -> dict[str, str]:
    """Each stamp's category in a template drawn with ``seed`` (by stamp key, so the order stamps come in does
    not matter)."""
    ordered = sorted(stamps, key=lambda s: s.key)
    drawn = np.random.default_rng([CAPTION_TAG, seed]).integers(len(CATEGORY_CAPTIONS), size=len(ordered))
    return {s.key: CATEGORY_CAPTIONS[t].format(c=readable(s.category)) for s, t in zip(ordered, drawn.tolist())}


def _candidate(row: int, stamp: Stamp, renderer: Optional[str], fields: dict[str, Any],
               label: Optional[int], caption: Optional[str] = None) -> Candidate:
    record = {"row": row, "stamp": stamp.key}
    if stamp.image.suffix.lower() == ".svg":
        load, arg = render_svg, (str(stamp.image), renderer)
    else:
        load, arg = load_file, str(stamp.image)
    files = {"cls": str(label).encode()} if label is not None else {}
    return Candidate(rows=[record], captions=[caption or stamp.description or ""], load=load, arg=arg,
                     fields={"stamp": stamp.key, "format": stamp.image.suffix.lower()[1:], **fields}, files=files)


def prep_tuxpaint(output: Path, stamps: Path = DEFAULT_STAMPS, held_out_fraction: float = 0.2, seed: int = 0,
                  image_size: Optional[int] = None, workers: Optional[int] = None,
                  svg_renderer: str = "auto", train_captions: str = "description") -> dict[str, Manifest]:
    """Write ``output/train``, ``output/retrieval`` and ``output/zeroshot`` (module docstring); returns their
    manifests by name."""
    output, stamps = Path(output), Path(stamps)
    check_options(EVAL_SHARD_SIZE, image_size, seed)
    if not 0.0 < held_out_fraction < 1.0:
        raise PrepError(f"--held-out-fraction must be between 0 and 1 (exclusive), got {held_out_fraction}")
    if train_captions not in TRAIN_CAPTIONS:
        raise PrepError(f"--train-captions {train_captions!r}: must be one of {', '.join(TRAIN_CAPTIONS)}")
    if not stamps.is_dir():
        raise PrepError(f"--stamps {stamps}: not a directory (Debian: apt-get install tuxpaint-stamps-default)")
    renderer = available_renderer(svg_renderer)
    found, counts = find_stamps(stamps)
    if not found:
        raise PrepError(f"--stamps {stamps}: no PNG or SVG stamps in its category folders")

    rows = {s.key: row for row, s in enumerate(found)}
    rejected = [(s, s.problem) for s in found if s.problem is not None]
    if renderer is None:
        rejected += [(s, "SVG stamp and no SVG renderer at hand (cairosvg, rsvg-convert)") for s in found
                     if s.problem is None and s.image.suffix.lower() == ".svg"]
    unusable = {s.key for s, _ in rejected}
    usable = [s for s in found if s.key not in unusable]
    held = held_out(usable, held_out_fraction, seed)
    train = [s for s in usable if s.key not in held]
    evaluation = [s for s in usable if s.key in held]
    categories = sorted({s.category for s in usable})
    labels = {c: i for i, c in enumerate(categories)}
    per_category = {c: sum(s.category == c for s in train) for c in categories}

    extra = {"stamps": len(found), "png_used": sum(s.image.suffix.lower() == ".png" for s in usable),
             "svg_used": sum(s.image.suffix.lower() == ".svg" for s in usable),
             "svg_left_out": sum(r.startswith("SVG stamp") for _, r in rejected),
             "without_description": sum(s.problem is not None for s in found),
             "variants_skipped": counts["variants"], "png_files": counts["png_files"],
             "svg_files": counts["svg_files"], "svg_renderer": renderer, "categories": categories,
             "train_per_category": [per_category[c] for c in categories], "held_out": len(evaluation)}
    source = {"kind": "tuxpaint", "path": str(stamps.resolve()), "held_out_fraction": held_out_fraction,
              "seed": seed, "image_size": image_size, "svg_renderer": renderer, "svg_width": SVG_WIDTH,
              "train_captions": train_captions}
    captions = category_captions(train, seed) if train_captions == "category" else {}

    def fields(stamp: Stamp) -> dict[str, Any]:
        count = per_category[stamp.category]
        return {"category": stamp.category, "concept": stamp.category, "concept_count": count,
                "concept_frequency": count / max(len(train), 1)}

    def items(split: str) -> list[Item]:
        if split == "train":
            out: list[Item] = [Rejection({"row": rows[s.key], "stamp": s.key}, reason) for s, reason in rejected]
            return out + [_candidate(rows[s.key], s, renderer, fields(s), None, captions.get(s.key))
                          for s in shuffled(train, True, seed)]
        label = split == "zeroshot"
        return [_candidate(rows[s.key], s, renderer, fields(s), labels[s.category] if label else None)
                for s in shuffled(evaluation, True, seed)]

    zeroshot_files = {"classnames.txt": "".join(readable(c) + "\n" for c in categories),
                      "templates.txt": "".join(t + "\n" for t in TEMPLATES)}
    # Enough train shards for several lanes, as the synthetic set has.
    shard_sizes = {"train": max(16, math.ceil(len(train) / 16)), "retrieval": EVAL_SHARD_SIZE,
                   "zeroshot": EVAL_SHARD_SIZE}
    manifests = {}
    for split in ("train", "retrieval", "zeroshot"):
        split_items = items(split)
        manifests[split] = write_dataset(
            output / split, {**source, "split": split, "shard_size": shard_sizes[split]}, split_items,
            shard_size=shard_sizes[split], image_size=image_size,
            workers=workers, kind=split, total=sum(isinstance(i, Candidate) for i in split_items), extra=extra,
            extra_files=zeroshot_files if split == "zeroshot" else None, rows_read=len(split_items),
            desc=f"tuxpaint {split}")
    left_out = f", {extra['svg_left_out']} SVG stamps left out (no SVG renderer)" if extra["svg_left_out"] else ""
    print(f"tuxpaint: {len(found)} stamps ({extra['png_used']} PNG, {extra['svg_used']} SVG rendered by "
          f"{renderer or 'none'}){left_out}, {extra['without_description']} without a description, "
          f"{counts['variants']} mirror/flip variants skipped; {len(train)} train, {len(evaluation)} held out "
          f"over {len(categories)} categories")
    return manifests
