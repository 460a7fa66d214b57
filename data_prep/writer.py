"""The machinery every prep source shares (SPEC 3.1-3.3): candidate sample -> dense indices -> atomic shards,
manifest and rejected log, with the image work in a process pool.

A source turns its input into a stream of ``Candidate`` (one image with its non-empty captions and the input
rows they came from) and ``Rejection`` (an input row refused before any image work). ``write_dataset`` runs
the image loaders in parallel, in input order, and gives each accepted image the next sample index and its
captions the next text indices, so the output depends only on the input, never on ``workers``.

Output directory policy (documented choice: refuse, never resume): the directory must be absent or empty, or
hold a complete manifest of the same source and options, in which case nothing is done ("already
prepared"). A directory holding another dataset, partial output or other files is refused. A failing run
removes what it wrote, so a retry starts clean; a killed run leaves only ``*.tar.tmp`` files and complete
shards without a manifest, which no reader accepts and a rerun refuses.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import webdataset as wds
from tqdm import tqdm

from clip_dro.errors import UserError
from clip_dro.manifest import MANIFEST_NAME, REJECTED_NAME, Manifest, ShardInfo, load_manifest, write_text_atomic
from data_prep.images import BadImage, EncodedImage, load_file

SHARD_NAME = "shard-{:06d}.tar"
KEY_DIGITS = 9
# Fixed tar metadata so that the same input gives the same bytes.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
# Candidates handed to a worker at a time, and chunks in flight per worker: enough to hide the IPC.
CHUNK = 16
IN_FLIGHT_PER_WORKER = 4
# Keys of a sample's .json that the writer owns; source fields may not override them.
RESERVED_FIELDS = ("index", "image_index", "text_index", "width", "height")

Loader = Callable[[Any, Optional[int]], EncodedImage]


class PrepError(UserError):
    """Bad prep input or output directory; the message names the file, row, column or option."""


@dataclass
class Rejection:
    """An input row refused without image work; ``row`` is what rejected.jsonl records (with "row": n)."""

    row: dict[str, Any]
    reason: str


@dataclass
class Candidate:
    """One image that becomes one sample unless its loader raises ``BadImage``.

    ``rows`` are the input rows it accounts for (accepted or rejected together), ``captions`` its cleaned
    captions in row order, ``load(arg, image_size)`` produces the image in a worker, ``fields`` are the source
    fields of its .json and ``files`` extra tar members (e.g. ``{"cls": b"3"}``).
    """

    rows: list[dict[str, Any]]
    captions: list[str]
    load: Loader
    arg: Any
    fields: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


Item = Union[Candidate, Rejection]


def clean_caption(value: Any) -> str:
    """A caption as one stripped line ("" for missing values): newlines inside become spaces."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return " ".join(str(value).split())


def image_items(image: str, records: list[dict[str, Any]], path: str, fields: dict[str, Any]) -> Iterator[Item]:
    """The input rows of one image (dicts with at least "row" and "caption"): a Rejection for each row with no
    image path or an empty caption, then one Candidate for the file at ``path`` with the usable rows."""
    good = []
    for record in records:
        if not image:
            yield Rejection(record, "missing image path")
        elif not clean_caption(record["caption"]):
            yield Rejection(record, "empty caption")
        else:
            good.append(record)
    if good:
        yield Candidate(rows=good, captions=[clean_caption(r["caption"]) for r in good], load=load_file, arg=path,
                        fields=fields)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_workers(workers: Optional[int]) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if workers < 1:
        raise PrepError(f"--workers must be >= 1, got {workers}")
    return workers


def check_options(shard_size: int, image_size: Optional[int]) -> None:
    if shard_size < 1:
        raise PrepError(f"--shard-size must be >= 1, got {shard_size}")
    if image_size is not None and image_size < 1:
        raise PrepError(f"--image-size must be >= 1, got {image_size}")


def _same_source(manifest_source: dict[str, Any], source: dict[str, Any]) -> bool:
    # "rows" is only known after reading the whole input, so it is not part of the identity.
    return {k: v for k, v in manifest_source.items() if k != "rows"} == source


def existing_output(output: Path, source: dict[str, Any], kind: str) -> Optional[Manifest]:
    """The manifest of an identical earlier run, None for a usable empty directory; refuses anything else."""
    if output.exists() and not output.is_dir():
        raise PrepError(f"output {output} exists and is not a directory")
    if not output.exists() or not any(output.iterdir()):
        return None
    if not (output / MANIFEST_NAME).is_file():
        raise PrepError(f"output {output} is not empty and holds no {MANIFEST_NAME} (partial output of an "
                        "interrupted prep, or other files); delete it or choose another --output")
    manifest = load_manifest(output)
    if manifest.kind != kind or not _same_source(manifest.source, source):
        raise PrepError(f"output {output} already holds another dataset (source {manifest.source}); "
                        "delete it or choose another --output")
    return manifest


def _load_chunk(tasks: list[tuple[Loader, Any]], image_size: Optional[int]) -> list[Union[EncodedImage, str]]:
    """Worker body: each task's image, or the reason it was refused."""
    results: list[Union[EncodedImage, str]] = []
    for load, arg in tasks:
        try:
            results.append(load(arg, image_size))
        except BadImage as exc:
            results.append(str(exc))
    return results


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _tasks(chunk: list[Item]) -> list[tuple[Loader, Any]]:
    return [(c.load, c.arg) for c in chunk if isinstance(c, Candidate)]


def ordered_results(items: Iterable[Item], image_size: Optional[int], workers: int
                    ) -> Iterator[tuple[Item, Union[EncodedImage, str, None]]]:
    """Each item with its loaded image (None for a Rejection), in input order, loading in ``workers`` processes.

    A bounded window of chunks is in flight, so memory stays flat however long the input is.
    """
    def paired(chunk: list[Item], results: list) -> Iterator[tuple[Item, Any]]:
        it = iter(results)
        for item in chunk:
            yield item, (next(it) if isinstance(item, Candidate) else None)

    if workers <= 1:
        for chunk in _chunks(items, CHUNK):
            yield from paired(chunk, _load_chunk(_tasks(chunk), image_size))
        return
    # fork: no re-import of the caller's __main__, and the loaders are plain functions of this package.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers) as pool:
        pending: deque = deque()
        for chunk in _chunks(items, CHUNK):
            pending.append((chunk, pool.apply_async(_load_chunk, (_tasks(chunk), image_size))))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                done, result = pending.popleft()
                yield from paired(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from paired(done, result.get())


class ShardSink:
    """Writes samples into shards of ``shard_size`` with webdataset's TarWriter, each under a ``.tmp`` name
    renamed when complete, so a reader never sees a half-written shard."""

    def __init__(self, directory: Path, shard_size: int):
        self.directory = directory
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self._writer: Optional[wds.TarWriter] = None
        self._file = None
        self._count = 0
        self._first = 0

    def _tmp_path(self) -> Path:
        return self.directory / (SHARD_NAME.format(len(self.shards)) + ".tmp")

    def write(self, sample: dict[str, Any], index: int) -> None:
        if self._writer is None:
            self._file = open(self._tmp_path(), "wb")
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME)
            self._first, self._count = index, 0
        self._writer.write(sample)
        self._count += 1
        if self._count == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        name = SHARD_NAME.format(len(self.shards))
        os.replace(self._tmp_path(), self.directory / name)
        self.shards.append(ShardInfo(name, self._count, self._first))
        self._writer = self._file = None

    def finish(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Remove everything written (the caller checked that the directory held none of it before)."""
        if self._writer is not None:
            self._file.close()
            self._tmp_path().unlink(missing_ok=True)
            self._writer = self._file = None
        for shard in self.shards:
            (self.directory / shard.name).unlink(missing_ok=True)


def _sample(key: str, index: int, text_indices: list[int], candidate: Candidate, image: EncodedImage
            ) -> dict[str, Any]:
    meta = {"index": index, "image_index": index, "text_index": text_indices}
    meta.update({k: v for k, v in candidate.fields.items() if k not in RESERVED_FIELDS})
    meta.update(width=image.width, height=image.height)
    sample: dict[str, Any] = {"__key__": key, image.ext: image.data,
                              "txt": "\n".join(candidate.captions).encode("utf-8"),
                              "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    sample.update(candidate.files)
    return sample


def write_dataset(
    output: Path,
    source: dict[str, Any],
    items: Iterable[Item],
    *,
    shard_size: int,
    image_size: Optional[int],
    workers: Optional[int],
    kind: str = "train",
    total: Optional[int] = None,
    extra: Optional[dict[str, Any]] = None,
    extra_files: Optional[dict[str, str]] = None,
    rows_read: Optional[int] = None,
    desc: str = "prep",
) -> Manifest:
    """Write ``items`` as a prep output directory and return its manifest (see the module docstring).

    ``source`` identifies the input and every option that changes the output; it is stored in the manifest
    (with ``rows`` added) and compared on a rerun. ``total`` is the expected number of images (progress
    bar). ``extra_files`` (name -> text) are written beside the shards before the manifest, which is written
    last and marks the directory complete. ``rows_read``, when the source knows it, is checked against
    accepted + rejected.
    """
    output = Path(output)
    previous = existing_output(output, source, kind)
    if previous is not None:
        print(f"{output}: already prepared ({previous.num_samples} samples, {previous.num_texts} captions)")
        return previous
    num_workers = resolve_workers(workers)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(output, shard_size)
    rejected: list[dict[str, Any]] = []
    accepted = num_texts = index = 0
    try:
        progress = tqdm(total=total, desc=desc, unit="img", disable=None)
        for item, image in ordered_results(items, image_size, num_workers):
            if isinstance(item, Rejection):
                rejected.append({**item.row, "reason": item.reason})
            elif isinstance(image, str):
                rejected.extend({**row, "reason": image} for row in item.rows)
            else:
                assert image is not None
                texts = list(range(num_texts, num_texts + len(item.captions)))
                sink.write(_sample(f"{index:0{KEY_DIGITS}d}", index, texts, item, image), index)
                index += 1
                num_texts += len(item.captions)
                accepted += len(item.rows)
            if isinstance(item, Candidate):
                progress.update(1)
        progress.close()
        shards = sink.finish()
        rows = accepted + len(rejected)
        if rows_read is not None and rows != rows_read:
            raise RuntimeError(f"prep accounted for {rows} rows of {rows_read}")
        rejected.sort(key=lambda r: r["row"])
        write_text_atomic(output / REJECTED_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
        for name, text in (extra_files or {}).items():
            write_text_atomic(output / name, text)
        manifest = Manifest(num_samples=index, num_images=index, num_texts=num_texts, shards=shards,
                            source={**source, "rows": rows}, accepted=accepted, rejected=len(rejected),
                            kind=kind, extra=dict(extra or {}))
        manifest.write(output)
    except BaseException:
        sink.abort()
        for name in [REJECTED_NAME, *(extra_files or {})]:
            (output / name).unlink(missing_ok=True)
        if created and not any(output.iterdir()):
            output.rmdir()
        raise
    print(f"{output}: {manifest.num_samples} samples, {manifest.num_texts} captions in {len(shards)} shards; "
          f"{manifest.accepted} rows accepted, {manifest.rejected} rejected")
    return manifest

