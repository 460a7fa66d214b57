"""``clip-dro prep csv``: a table of image path + caption (csv, tsv, parquet, jsonl) -> prep shards.

A row is one (image, caption) pair; rows naming the same image form one sample whose captions keep the
rows' order. Samples come in a seeded random order of the images (``--seed``, recorded in the manifest's
source), so a table sorted by source or class does not give clustered shards and batches; with
``--no-shuffle`` they follow the order in which images first appear. Rows are numbered from 0 (header
excluded) in rejected.jsonl. Only the image path is kept as a source field (other columns may differ between
the rows of one image).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pandas as pd

from clip_dro.manifest import Manifest
from data_prep.writer import Item, PrepError, check_options, file_sha256, image_items, shuffled, write_dataset


def _read_csv(sep: str) -> Callable[[Path], pd.DataFrame]:
    # Strings only, and "" stays "" (not NaN), so paths and captions arrive as written.
    return lambda path: pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": _read_csv(","),
    ".tsv": _read_csv("\t"),
    ".parquet": pd.read_parquet,
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),
}


def read_table(path: Path) -> pd.DataFrame:
    """The table at ``path``, read by the pandas reader its extension names; a UserError otherwise."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PrepError(f"--input {path}: unknown table format {path.suffix!r} (expected one of {sorted(READERS)})")
    if not path.is_file():
        raise PrepError(f"--input {path}: no such file")
    try:
        return reader(path)
    except Exception as exc:  # pandas and pyarrow raise many types for a malformed file
        raise PrepError(f"--input {path}: cannot read as {path.suffix[1:]} ({type(exc).__name__}: {exc})") from None


def _image_path(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()


def group_rows(paths: list[Any], captions: list[Any], image_root: Optional[Path], shuffle: bool = False,
               seed: int = 0) -> Iterator[Item]:
    """Rows -> one Candidate per image (first-appearance order, or a (seed) permutation of it) and a Rejection
    per unusable row."""
    groups: dict[str, list[int]] = {}
    for row, value in enumerate(paths):
        groups.setdefault(_image_path(value), []).append(row)
    for image, rows in shuffled(list(groups.items()), shuffle, seed):
        records = [{"row": r, "image": image, "caption": captions[r]} for r in rows]
        full_path = Path(image) if image_root is None else image_root / image
        yield from image_items(image, records, str(full_path), {"image": image})


def _json_safe(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def prep_table(input: Path, output: Path, image_col: str, caption_col: str, image_root: Optional[Path] = None,
               shard_size: int = 1000, image_size: Optional[int] = None, workers: Optional[int] = None,
               shuffle: bool = True, seed: int = 0, background: Any = "white") -> Manifest:
    """Prep the table ``input`` into ``output`` (design.md §2.1, ``prep csv``); returns the manifest."""
    input, output = Path(input), Path(output)
    rgb = check_options(shard_size, image_size, seed, background)
    if image_root is not None and not Path(image_root).is_dir():
        raise PrepError(f"--image-root {image_root}: not a directory")
    table = read_table(input)
    for option, column in (("--image-col", image_col), ("--caption-col", caption_col)):
        if column not in table.columns:
            raise PrepError(f"{input}: {option} {column!r} is not a column (columns: {list(map(str, table.columns))})")
    root = None if image_root is None else Path(image_root).resolve()
    source = {"kind": "csv", "path": str(input.resolve()), "sha256": file_sha256(input), "image_col": image_col,
              "caption_col": caption_col, "image_root": None if root is None else str(root),
              "shard_size": shard_size, "image_size": image_size, "shuffle": shuffle, "seed": seed,
              "background": list(rgb)}
    captions = [_json_safe(c) for c in table[caption_col].tolist()]
    paths = table[image_col].tolist()
    return write_dataset(output, source, group_rows(paths, captions, root, shuffle, seed), shard_size=shard_size,
                         image_size=image_size, workers=workers, total=len(set(map(_image_path, paths))),
                         rows_read=len(table), desc=f"prep {input.name}", background=rgb)
