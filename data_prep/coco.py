"""``clip-dro prep coco``: Karpathy-style caption JSON (MSCOCO, Flickr30K train, val and test) -> prep shards.

The file is a list of records ``{"image": path, "caption": str | [str, ...], ...}``. Train files hold one
record per caption (a string); val/test files one record per image (a list). Either way a row is one caption
(numbered from 0 across the file in rejected.jsonl, with its record number), records of the same image are
grouped into one sample, and ``image`` (and ``image_id`` when present) are kept as source fields. Samples come
in a seeded random order of the images (``--seed``; ``--no-shuffle``: first-appearance order). A val/test
output carries all captions per image, so it also serves as a retrieval set.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from clip_dro.manifest import Manifest
from data_prep.writer import Item, PrepError, check_options, file_sha256, image_items, shuffled, write_dataset


def read_annotations(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``, checked for shape before any image work."""
    if not path.is_file():
        raise PrepError(f"--annotations {path}: no such file")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrepError(f"--annotations {path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise PrepError(f"--annotations {path}: expected a JSON list of records with 'image' and 'caption'")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record or "caption" not in record:
            raise PrepError(f"--annotations {path}: record {i} needs keys 'image' and 'caption'")
        caption = record["caption"]
        if not isinstance(caption, (str, list)) or (isinstance(caption, list)
                                                     and not all(isinstance(c, str) for c in caption)):
            raise PrepError(f"--annotations {path}: record {i}: 'caption' must be a string or a list of strings")
    return records


def record_captions(record: dict[str, Any]) -> list[str]:
    """A record's caption rows; an empty list counts as one empty caption, so the record is not lost silently."""
    captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
    return captions or [""]


def group_records(records: list[dict[str, Any]], image_root: Path, shuffle: bool = False, seed: int = 0
                  ) -> Iterator[Item]:
    """Records -> one Candidate per image (first-appearance order, or a (seed) permutation of it) and a
    Rejection per unusable caption row."""
    groups: dict[str, list[dict[str, Any]]] = {}
    row = 0
    for number, record in enumerate(records):
        image = str(record["image"]).strip()
        for caption in record_captions(record):
            groups.setdefault(image, []).append({"row": row, "record": number, "image": image, "caption": caption,
                                                 "image_id": record.get("image_id")})
            row += 1
    for image, rows in shuffled(list(groups.items()), shuffle, seed):
        fields: dict[str, Any] = {"image": image}
        if rows[0]["image_id"] is not None:
            fields["image_id"] = rows[0]["image_id"]
        logged = [{k: v for k, v in r.items() if k != "image_id"} for r in rows]
        yield from image_items(image, logged, str(image_root / image), fields)


def prep_coco(annotations: Path, image_root: Path, output: Path, shard_size: int = 1000,
              image_size: Optional[int] = None, workers: Optional[int] = None, shuffle: bool = True, seed: int = 0,
              background: Any = "white") -> Manifest:
    """Prep the Karpathy-style file ``annotations`` into ``output`` (design.md §2.1, ``prep coco``)."""
    annotations, output = Path(annotations), Path(output)
    rgb = check_options(shard_size, image_size, seed, background)
    if not Path(image_root).is_dir():
        raise PrepError(f"--image-root {image_root}: not a directory")
    records = read_annotations(annotations)
    root = Path(image_root).resolve()
    source = {"kind": "coco", "path": str(annotations.resolve()), "sha256": file_sha256(annotations),
              "image_root": str(root), "shard_size": shard_size, "image_size": image_size, "shuffle": shuffle,
              "seed": seed, "background": list(rgb)}
    rows = sum(len(record_captions(r)) for r in records)
    images = len({str(r["image"]).strip() for r in records})
    return write_dataset(output, source, group_records(records, root, shuffle, seed), shard_size=shard_size,
                         image_size=image_size, workers=workers, total=images, rows_read=rows,
                         desc=f"prep {annotations.name}", background=rgb)
