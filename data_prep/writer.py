"""The machinery every prep source shares (design.md §3.1–3.3): candidate sample -> dense indices -> atomic shards,
manifest and rejected log, with the image work in a process pool.

A source turns its input into a stream of ``Candidate`` (one image with its non-empty captions and the input
rows they came from) and ``Rejection`` (an input row refused before any image work). ``write_dataset`` runs
the image loaders in parallel, in input order, and gives each accepted image the next sample index and its
captions the next text indices, so the output depends only on the input (and the seed of the sources' row
shuffle), never on ``workers``.

Output directory policy: the directory must be absent or empty; or hold a complete manifest of the same source
and options, in which case nothing is done ("already prepared"); or hold the partial output of an interrupted
run of the same source and options, which is resumed. Anything else is refused.

Resuming. Each shard is written under a ``.tmp`` name and renamed when complete; then one line appended to
``prep-progress.jsonl`` (after a header naming the source and options) records it (name, samples, bytes) with
the counters, how many items of the stream were consumed (and the source's cursor, for sources that can
restart mid-way without reading what came before) and the length of ``rejected.jsonl.partial`` (rejected rows
in processing order). Appending keeps the cost per shard constant at any number of shards; a line cut short
by a kill is ignored. A rerun of the same command after an interruption (kill -9, an error) keeps those
shards, drops anything written after the last record, skips the consumed items without image work and goes
on; the result is byte-identical to an uninterrupted run. The manifest is written last and marks the
directory complete; the progress files are then removed. (Files are not fsynced: this survives the death of
the process, not of the machine's power.)
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import webdataset as wds
from tqdm import tqdm

from clip_dro.data.shard_reader import parse_background
from clip_dro.errors import UserError
from clip_dro.manifest import (MANIFEST_NAME, REJECTED_NAME, Manifest, ShardInfo, check_plain_name, load_manifest,
                               write_text_atomic)
from clip_dro.run_lock import LOCK_FILE, lock_prep_dir, unlock_prep_dir
from data_prep.images import BadImage, EncodedImage, ImageOptions, load_file

SHARD_NAME = "shard-{:06d}.tar"
KEY_DIGITS = 9
PROGRESS_NAME = "prep-progress.jsonl"
PARTIAL_REJECTED = REJECTED_NAME + ".partial"
PROGRESS_VERSION = 1
# Fixed tar metadata so that the same input gives the same bytes.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
# Candidates handed to a worker at a time, and chunks in flight per worker: enough to hide the IPC.
CHUNK = 16
IN_FLIGHT_PER_WORKER = 4
# Keys of a sample's .json that the writer owns; source fields may not override them.
RESERVED_FIELDS = ("index", "image_index", "text_index", "width", "height")
SHUFFLE_TAG = 11  # first word of the row-shuffle seed sequence

Loader = Callable[[Any, ImageOptions], EncodedImage]


class PrepError(UserError):
    """Bad prep input or output directory; the message names the file, row, column or option."""


@dataclass
class Rejection:
    """An input row refused without image work; ``row`` is what rejected.jsonl records (with "row": n).
    ``cursor`` (JSON-able) lets a source restart after this item (see ``write_dataset``)."""

    row: dict[str, Any]
    reason: str
    cursor: Any = None


@dataclass
class Candidate:
    """One image that becomes one sample unless its loader raises ``BadImage``.

    ``rows`` are the input rows it accounts for (accepted or rejected together), ``captions`` its cleaned
    captions in row order, ``load(arg, options)`` produces the image in a worker, ``fields`` are the source
    fields of its .json and ``files`` extra tar members (e.g. ``{"cls": b"3"}``).
    """

    rows: list[dict[str, Any]]
    captions: list[str]
    load: Loader
    arg: Any
    fields: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    cursor: Any = None


Item = Union[Candidate, Rejection]
# A source: the items themselves (a rerun skips the consumed ones), or a function of the cursor of the last
# consumed item (None: from the start) that returns the items after it.
Items = Union[Iterable[Item], Callable[[Any], Iterable[Item]]]


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


def check_options(shard_size: int, image_size: Optional[int], seed: int = 0, background: Any = "white"
                  ) -> tuple[int, int, int]:
    """Refuse bad common options before any work; returns the background as RGB."""
    if shard_size < 1:
        raise PrepError(f"--shard-size must be >= 1, got {shard_size}")
    if image_size is not None and image_size < 1:
        raise PrepError(f"--image-size must be >= 1, got {image_size}")
    if seed < 0:
        raise PrepError(f"--seed must be >= 0, got {seed}")
    try:
        return parse_background(background)
    except ValueError as exc:
        raise PrepError(f"--background: {exc}") from None


def shuffled(items: list, shuffle: bool, seed: int) -> list:
    """``items`` in a (seed)-permuted order when ``shuffle`` (prep's row shuffle), else as they are."""
    if not shuffle:
        return items
    return [items[i] for i in np.random.default_rng([SHUFFLE_TAG, seed]).permutation(len(items))]


def _same_source(manifest_source: dict[str, Any], source: dict[str, Any]) -> bool:
    # "rows" is only known after reading the whole input, so it is not part of the identity.
    return {k: v for k, v in manifest_source.items() if k != "rows"} == source


def _load_chunk(tasks: list[tuple[Loader, Any]], options: ImageOptions) -> list[Union[EncodedImage, str]]:
    """Worker body: each task's image, or the reason it was refused."""
    results: list[Union[EncodedImage, str]] = []
    for load, arg in tasks:
        try:
            results.append(load(arg, options))
        except BadImage as exc:
            results.append(str(exc))
    return results


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _tasks(chunk: list[Item]) -> list[tuple[Loader, Any]]:
    return [(c.load, c.arg) for c in chunk if isinstance(c, Candidate)]


def ordered_results(items: Iterable[Item], options: ImageOptions, workers: int
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
            yield from paired(chunk, _load_chunk(_tasks(chunk), options))
        return
    # fork: no re-import of the caller's __main__, and the loaders are plain functions of this package.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers) as pool:
        pending: deque = deque()
        for chunk in _chunks(items, CHUNK):
            pending.append((chunk, pool.apply_async(_load_chunk, (_tasks(chunk), options))))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                done, result = pending.popleft()
                yield from paired(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from paired(done, result.get())


class ShardSink:
    """Writes samples into shards of ``shard_size`` with webdataset's TarWriter, each under a ``.tmp`` name
    renamed when complete, so a reader never sees a half-written shard. ``on_shard`` is called after each
    rename."""

    def __init__(self, directory: Path, shard_size: int, shards: Optional[list[ShardInfo]] = None,
                 on_shard: Optional[Callable[[], None]] = None):
        self.directory = directory
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = list(shards or [])
        self.on_shard = on_shard
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
        if self.on_shard is not None:
            self.on_shard()

    def finish(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def discard_open(self) -> None:
        """Drop the shard being written (complete shards stay)."""
        if self._writer is not None:
            self._file.close()
            self._tmp_path().unlink(missing_ok=True)
            self._writer = self._file = None


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


_COUNTERS = ("consumed", "cursor", "index", "num_texts", "accepted", "rejected", "rejected_bytes")


@dataclass
class _Progress:
    """What a resumed run continues from: the last record of prep-progress.jsonl, and every shard recorded."""

    shards: list[ShardInfo] = field(default_factory=list)
    shard_bytes: list[int] = field(default_factory=list)
    consumed: int = 0  # items of the source stream fully accounted for
    cursor: Any = None  # the cursor of the last consumed item
    index: int = 0  # next sample index
    num_texts: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_bytes: int = 0  # length of rejected.jsonl.partial that belongs to the consumed items

    def record(self) -> bytes:
        """The log line of the last shard: the shard and the counters after it."""
        shard = self.shards[-1]
        data = {"name": shard.name, "num_samples": shard.num_samples, "first_index": shard.first_index,
                "bytes": self.shard_bytes[-1], **{k: getattr(self, k) for k in _COUNTERS}}
        return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")

    @staticmethod
    def header(kind: str, source: dict[str, Any]) -> str:
        return json.dumps({"progress_version": PROGRESS_VERSION, "kind": kind, "source": source},
                          ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, path: Path) -> tuple[dict[str, Any], "_Progress", int]:
        """(header, progress, bytes of the log that hold whole lines). A line cut short by a kill while it was
        being appended is not part of the log."""
        try:
            content = path.read_bytes()
            lines = content.split(b"\n")[:-1]  # only newline-terminated lines
            header = json.loads(lines[0])
            if not isinstance(header, dict) or header.get("progress_version") != PROGRESS_VERSION:
                raise ValueError("unknown progress format")
            progress = cls()
            for number, line in enumerate(lines[1:], start=2):
                data = json.loads(line)
                name = check_plain_name(data["name"], f"{path}: line {number}: name")
                progress.shards.append(ShardInfo(name, data["num_samples"], data["first_index"]))
                progress.shard_bytes.append(data["bytes"])
                for key in _COUNTERS:
                    setattr(progress, key, data[key])
        except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
            raise PrepError(f"{path}: cannot resume from it ({exc}); delete the output directory and start "
                            "again") from None
        return header, progress, sum(len(line) + 1 for line in lines)


def _append_record(log: Any, line: bytes) -> None:
    """Append one whole line to the progress log (a kill can cut it short: the reader ignores such a line)."""
    log.write(line)
    log.flush()


def _our_file(name: str) -> bool:
    """Files a prep run writes: shards, their temporaries, the manifest, rejected rows and progress."""
    base = name[:-4] if name.endswith(".tmp") else name
    return (base.startswith("shard-") and base.endswith(".tar")) or base in (
        MANIFEST_NAME, REJECTED_NAME, PROGRESS_NAME, PARTIAL_REJECTED)


def _contents(output: Path) -> list[Path]:
    """What the output directory holds, but for the lock of the prep that holds it."""
    return [p for p in output.iterdir() if p.name != LOCK_FILE]


def _remove_progress(output: Path) -> None:
    for name in (PROGRESS_NAME, PARTIAL_REJECTED, PROGRESS_NAME + ".tmp"):
        (output / name).unlink(missing_ok=True)


def existing_output(output: Path, source: dict[str, Any], kind: str,
                    extra_files: Iterable[str] = ()) -> tuple[Optional[Manifest], Optional[_Progress]]:
    """(manifest, None) for the complete output of an identical earlier run, (None, progress) for the partial
    output of an interrupted identical run (cleaned up to its last progress record), (None, None) for a
    usable empty directory; refuses anything else."""
    if all(p.name.endswith(".tmp") and _our_file(p.name) for p in _contents(output)):
        for path in _contents(output):  # a run stopped before it recorded anything
            path.unlink()
    if not _contents(output):
        return None, None
    if (output / MANIFEST_NAME).is_file():
        manifest = load_manifest(output)
        if manifest.kind != kind or not _same_source(manifest.source, source):
            raise PrepError(f"output {output} already holds another dataset (source {manifest.source}); "
                            "delete it or choose another --output")
        _remove_progress(output)  # left when a run was stopped right after writing its manifest
        return manifest, None
    if not (output / PROGRESS_NAME).is_file():
        raise PrepError(f"output {output} is not empty and holds no {MANIFEST_NAME} nor {PROGRESS_NAME} (other "
                        "files, or the output of a prep run that could not record its progress); delete it or "
                        "choose another --output")
    header, progress, whole = _Progress.read(output / PROGRESS_NAME)
    if header.get("kind") != kind or header.get("source") != source:
        raise PrepError(f"output {output} holds the partial output of another prep (source "
                        f"{header.get('source')}); rerun that command to finish it, or delete the directory or "
                        "choose another --output")
    ours = {s.name for s in progress.shards}
    for shard, size in zip(progress.shards, progress.shard_bytes):
        path = output / shard.name
        if not path.is_file() or path.stat().st_size != size:
            raise PrepError(f"output {output}: shard {shard.name} recorded as complete in {PROGRESS_NAME} is "
                            "missing or changed; delete the directory and start again")
    strangers = [p.name for p in _contents(output) if not _our_file(p.name) and p.name not in extra_files]
    if strangers:
        raise PrepError(f"output {output} holds files prep did not write ({strangers[0]}); delete them or choose "
                        "another --output")
    for path in _contents(output):  # what was written after the last progress record
        if path.name not in ours and path.name not in (PROGRESS_NAME, PARTIAL_REJECTED):
            path.unlink()
    for name, length, what in ((PROGRESS_NAME, whole, "its whole lines"),
                               (PARTIAL_REJECTED, progress.rejected_bytes, f"what {PROGRESS_NAME} records")):
        with open(output / name, "ab") as f:
            if f.tell() < length:
                raise PrepError(f"output {output}: {name} is shorter than {what}; delete the directory and start "
                                "again")
            f.truncate(length)
    return None, progress


def _skip(items: Items, progress: _Progress) -> Iterable[Item]:
    if callable(items):
        return items(progress.cursor if progress.consumed else None)
    return islice(items, progress.consumed, None)


def write_dataset(
    output: Path,
    source: dict[str, Any],
    items: Items,
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
    background: tuple[int, int, int] = (255, 255, 255),
) -> Manifest:
    """Write ``items`` as a prep output directory and return its manifest (see the module docstring).

    ``source`` identifies the input and every option that changes the output; it is stored in the manifest
    (with ``rows`` added) and compared on a rerun. ``total`` is the expected number of images (progress
    bar). ``extra_files`` (name -> text) are written beside the shards before the manifest, which is written
    last and marks the directory complete. ``rows_read``, when the source knows it, is checked against
    accepted + rejected. Images with transparency are composited onto ``background``.
    """
    output = Path(output)
    with _one_writer(output):
        return _write(output, source, items, shard_size, image_size, workers, kind, total, extra, extra_files,
                      rows_read, desc, background)


@contextmanager
def _one_writer(output: Path) -> Iterator[None]:
    """Hold the output directory's lock (created if need be) for as long as the prep writes; a directory this
    made and that stayed empty is removed again."""
    if output.exists() and not output.is_dir():
        raise PrepError(f"output {output} exists and is not a directory")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    lock = lock_prep_dir(output)
    try:
        yield
    finally:
        unlock_prep_dir(output, lock)
        if created and not any(output.iterdir()):
            output.rmdir()


def _write(output: Path, source: dict[str, Any], items: Items, shard_size: int, image_size: Optional[int],
           workers: Optional[int], kind: str, total: Optional[int], extra: Optional[dict[str, Any]],
           extra_files: Optional[dict[str, str]], rows_read: Optional[int], desc: str,
           background: tuple[int, int, int]) -> Manifest:
    previous, progress = existing_output(output, source, kind, extra_files or {})
    if previous is not None:
        print(f"{output}: already prepared ({previous.num_samples} samples, {previous.num_texts} captions)")
        return previous
    num_workers = resolve_workers(workers)
    resumed = progress is not None
    progress = progress or _Progress()
    if resumed:
        print(f"{output}: resuming an interrupted prep after {len(progress.shards)} complete shards "
              f"({progress.index} samples)")
    if not resumed:  # first, so that a run stopped before its first shard also resumes
        write_text_atomic(output / PROGRESS_NAME, _Progress.header(kind, source))
    rejected_log = open(output / PARTIAL_REJECTED, "ab")
    state = {"consumed": progress.consumed, "cursor": progress.cursor}
    progress_log = open(output / PROGRESS_NAME, "ab")

    def record() -> None:  # called when a shard is complete: everything consumed so far is accounted for
        rejected_log.flush()
        progress.shards = list(sink.shards)
        progress.shard_bytes.append((output / sink.shards[-1].name).stat().st_size)
        progress.consumed, progress.cursor = state["consumed"], state["cursor"]
        progress.index, progress.num_texts, progress.accepted = index, num_texts, accepted
        progress.rejected, progress.rejected_bytes = rejected, rejected_log.tell()
        _append_record(progress_log, progress.record())

    sink = ShardSink(output, shard_size, progress.shards, on_shard=record)
    index, num_texts, accepted, rejected = progress.index, progress.num_texts, progress.accepted, progress.rejected
    options = ImageOptions(image_size, background)
    try:
        progress_bar = tqdm(total=total, initial=min(index, total or index), desc=desc, unit="img", disable=None)
        for item, image in ordered_results(_skip(items, progress), options, num_workers):
            bad_rows: list[dict[str, Any]] = []
            if isinstance(item, Rejection):
                bad_rows = [{**item.row, "reason": item.reason}]
            elif isinstance(image, str):
                bad_rows = [{**row, "reason": image} for row in item.rows]
            for row in bad_rows:
                rejected_log.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            rejected += len(bad_rows)
            state["consumed"] += 1
            state["cursor"] = item.cursor
            if isinstance(item, Candidate) and not isinstance(image, str):
                assert image is not None
                texts = list(range(num_texts, num_texts + len(item.captions)))
                sample = _sample(f"{index:0{KEY_DIGITS}d}", index, texts, item, image)
                index += 1
                num_texts += len(item.captions)
                accepted += len(item.rows)
                sink.write(sample, index - 1)  # may complete a shard, which records the progress
            if isinstance(item, Candidate):
                progress_bar.update(1)
        progress_bar.close()
        shards = sink.finish()
        rows = accepted + rejected
        if rows_read is not None and rows != rows_read:
            raise RuntimeError(f"prep accounted for {rows} rows of {rows_read}")
        rejected_log.close()
        progress_log.close()
        # split on "\n" only: JSON escapes it, while captions may hold other line separators (U+2028, ...)
        lines = (output / PARTIAL_REJECTED).read_text(encoding="utf-8").split("\n")[:-1]
        lines.sort(key=lambda line: json.loads(line)["row"])
        write_text_atomic(output / REJECTED_NAME, "".join(line + "\n" for line in lines))
        for name, text in (extra_files or {}).items():
            write_text_atomic(output / name, text)
        manifest = Manifest(num_samples=index, num_images=index, num_texts=num_texts, shards=shards,
                            source={**source, "rows": rows}, accepted=accepted, rejected=rejected,
                            kind=kind, extra=dict(extra or {}))
        manifest.write(output)
        _remove_progress(output)
    except BaseException:
        sink.discard_open()
        rejected_log.close()
        progress_log.close()
        if not sink.shards:  # nothing worth resuming from: leave the directory as it was
            _remove_progress(output)
        raise
    print(f"{output}: {manifest.num_samples} samples, {manifest.num_texts} captions in {len(shards)} shards; "
          f"{manifest.accepted} rows accepted, {manifest.rejected} rejected")
    return manifest
