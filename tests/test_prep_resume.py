"""Prep that survives: a prep process killed with SIGKILL at any point finishes when the same command is run
again, reusing its complete shards, with output byte-identical to an uninterrupted run; damaged input tars
and images are rejected rows, never the end of the run."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import tarfile
from pathlib import Path

import pandas as pd
import pytest

import data_prep.reshard as reshard
import data_prep.writer as writer
from clip_dro.cli import main as cli
from clip_dro.data.shard_reader import iter_tar
from clip_dro.errors import UserError
from clip_dro.manifest import load_manifest
from data_prep.images import load_bytes
from data_prep.reshard import prep_wds
from data_prep.writer import PROGRESS_NAME, Candidate, write_dataset
from datagen import caption, id_of_image, image_bytes, read_dataset, tar_bytes, write_images, write_wds_input

SHARD_SIZE = 4


@pytest.fixture(scope="module")
def table(module_tmp) -> tuple[Path, Path]:
    """30 images with 1-2 captions, plus rows that are rejected (a missing file, a damaged image, an empty
    caption): 8 shards of up to 4 samples."""
    tmp = module_tmp("table")
    names = write_images(tmp / "images", range(30))
    (tmp / "images" / "damaged.jpg").write_bytes(image_bytes(0)[:60])
    rows = [(names[i], caption(i, j)) for j in range(2) for i in range(30) if j == 0 or i % 3 == 0]
    rows += [("missing.jpg", "item 99 caption 0"), ("damaged.jpg", "item 98 caption 0"), (names[5], " ")]
    csv = tmp / "table.csv"
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(csv, index=False)
    return csv, tmp / "images"


def argv(table, out: Path, workers: int = 1) -> list[str]:
    csv, root = table
    return ["prep", "csv", "--input", str(csv), "--output", str(out), "--image-col", "filepath", "--caption-col",
            "title", "--image-root", str(root), "--shard-size", str(SHARD_SIZE), "--workers", str(workers),
            "--seed", "5"]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def reference(table, module_tmp) -> dict[str, bytes]:
    out = module_tmp("ref") / "out"
    assert cli(argv(table, out)) == 0
    return files(out)


_LOADS = [0, 0]  # loads so far in this process, the load to die at


def _killing_load(path, options):
    """A prep loader (picklable by reference, for pool workers) that kills the process group at a load."""
    _LOADS[0] += 1
    if _LOADS[0] == _LOADS[1]:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return (_REAL_LOAD_BYTES if isinstance(path, bytes) else _REAL_LOAD)(path, options)


_REAL_LOAD, _REAL_LOAD_BYTES = writer.load_file, reshard.load_bytes


def _run_until_killed(args: list[str], point: tuple[str, str, int]) -> None:
    """Child process body: run the prep command and SIGKILL this process group at ``point``:
    ("load", "", n) at the n-th image load (of a process: each pool worker counts its own); ("before" |
    "after", NAME, n) around the n-th os.replace onto NAME; ("append" | "appended", "", n) before or after the
    n-th progress record, ("torn", "", n) half-way through writing it."""
    os.setsid()  # our own process group: the kill takes prep's pool workers along
    kind, target, nth = point
    count = [0]

    def die() -> None:
        os.killpg(os.getpgid(0), signal.SIGKILL)

    if kind == "load":
        _LOADS[:] = [0, nth]
        writer.load_file = reshard.load_bytes = _killing_load
    elif kind in ("append", "appended", "torn"):
        real_append = writer._append_record

        def append(log, line):
            count[0] += 1
            if count[0] == nth and kind != "appended":
                if kind == "torn":
                    real_append(log, line[:len(line) // 2])
                die()
            real_append(log, line)
            if count[0] == nth:
                die()
        writer._append_record = append
    else:
        real_replace = os.replace

        def replace(src, dst):
            hit = Path(dst).name == target
            count[0] += hit
            if hit and count[0] == nth and kind == "before":
                die()
            real_replace(src, dst)
            if hit and count[0] == nth and kind == "after":
                die()
        os.replace = replace
    cli(args)
    os._exit(0)  # not killed: the point was never reached


def run_killed(args: list[str], point: tuple[str, str, int]) -> None:
    child = multiprocessing.get_context("fork").Process(target=_run_until_killed, args=(args, point))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, (point, child.exitcode)


def progress_records(out: Path) -> list[dict]:
    """The whole shard records of a progress log (after its header line)."""
    return [json.loads(line) for line in (out / PROGRESS_NAME).read_bytes().split(b"\n")[1:-1]]


def assert_no_half_shard(out: Path) -> None:
    """Whatever a kill leaves, a file named like a shard is a complete tar (partial ones are *.tmp)."""
    for path in out.glob("shard-*.tar"):
        with open(path, "rb") as f:
            assert list(iter_tar(f, str(path)))


KILL_POINTS = [
    ("load", "", 1),  # before the first shard
    ("load", "", 11),  # in the middle of the third shard
    ("before", "shard-000002.tar", 1),  # a shard written in full, not yet renamed
    ("after", "shard-000003.tar", 1),  # a shard renamed, its progress not yet recorded
    ("append", "", 2),  # the second shard renamed, its progress not yet recorded
    ("torn", "", 3),  # the third shard's progress record cut short
    ("appended", "", 5),  # just after the fifth shard's record
    ("before", PROGRESS_NAME, 1),  # the progress header written, not yet renamed
    ("before", "rejected.jsonl", 1),  # every shard done, the final files not
    ("before", "manifest.json", 1),
    ("after", "manifest.json", 1),  # complete, the progress files not yet removed
]


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[0]}-{p[1] or 'image'}-{p[2]}")
def test_killed_prep_resumes_to_the_same_bytes(table, reference, tmp_path, point):
    out = tmp_path / "out"
    run_killed(argv(table, out), point)
    assert_no_half_shard(out)
    if point[1] != "manifest.json" or point[0] == "before":
        with pytest.raises(UserError):
            load_manifest(out)  # no reader takes an interrupted output for a dataset
    assert cli(argv(table, out)) == 0
    assert files(out) == reference


def test_killed_again_and_again_with_workers(table, reference, tmp_path):
    """Three kills in a row (one in a pool worker), each rerun resuming the last; then it finishes."""
    out = tmp_path / "out"
    for point in [("load", "", 6), ("load", "", 9), ("torn", "", 3)]:
        run_killed(argv(table, out, workers=2), point)
        assert_no_half_shard(out)
    records = progress_records(out)
    assert len(records) >= 2 and not (out / PROGRESS_NAME).read_bytes().endswith(b"\n")  # a torn last line
    kept = {r["name"]: (out / r["name"]).stat().st_mtime_ns for r in records}
    assert cli(argv(table, out, workers=2)) == 0
    assert files(out) == reference
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # complete shards reused, not rewritten


def test_killed_prep_wds_resumes_mid_interleave(tmp_path):
    """prep wds with its shuffle: 20 input shards, 16 open at once; a resumed run restarts from the open
    shards' positions recorded with the last complete output shard."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for shard in range(20):
        write_wds_input(inputs / f"{shard:05d}.tar", [
            {"__key__": f"{shard:02d}{i}", "jpg": image_bytes(10 * shard + i),
             "txt": caption(10 * shard + i, 0).encode()}
            for i in range(shard % 4 + 1)])
    args = lambda out: ["prep", "wds", "--input", str(inputs / "{00000..00019}.tar"), "--output", str(out),  # noqa: E731
                        "--shard-size", "4", "--workers", "1", "--seed", "2"]
    assert cli(args(tmp_path / "ref")) == 0
    reference = files(tmp_path / "ref")
    source_order = [s["meta"]["source_key"] for s in read_dataset(tmp_path / "ref")]
    assert len(source_order) == 50 and source_order != sorted(source_order)  # interleaved
    for point in [("load", "", 7), ("appended", "", 4), ("load", "", 25)]:
        out = tmp_path / f"out-{point[0]}-{point[2]}"
        run_killed(args(out), point)
        assert all(r["cursor"]["open"] for r in progress_records(out))
        assert cli(args(out)) == 0
        assert files(out) == reference, point


def test_failed_run_resumes_and_other_partial_output_is_refused(tmp_path):
    def items(fail: bool):
        for i in range(40):  # prep reads items in chunks of 16: the first two chunks make shards
            if fail and i == 35:
                raise OSError("input went away")
            yield Candidate(rows=[{"row": i}], captions=[f"item {i} caption 0"], load=load_bytes, arg=image_bytes(i))

    def write(fail: bool, shard_size: int = 2):
        return write_dataset(tmp_path / "out", {"kind": "test"}, items(fail), shard_size=shard_size, image_size=None,
                             workers=1)

    write(False, shard_size=2)
    want = files(tmp_path / "out")
    for path in (tmp_path / "out").iterdir():
        path.unlink()
    with pytest.raises(OSError, match="went away"):
        write(True)
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / "manifest.json").exists()
    assert len(progress_records(tmp_path / "out")) == 16
    with pytest.raises(UserError, match="partial output of another prep"):
        write_dataset(tmp_path / "out", {"kind": "other"}, items(False), shard_size=2, image_size=None, workers=1)
    manifest = write(False)
    assert manifest.num_samples == 40 and files(tmp_path / "out") == want


def test_damaged_input_tars_are_rejected_rows_and_prep_goes_on(tmp_path):
    def samples(shard: int, n: int = 5) -> list[dict]:
        return [{"__key__": f"{shard}{i:04d}", "jpg": image_bytes(10 * shard + i),
                 "txt": caption(10 * shard + i, 0).encode()} for i in range(n)]

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_wds_input(inputs / "00000.tar", samples(0))
    data = tar_bytes(samples(1))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    cut_in_data = members[7].offset_data + 10  # inside sample 3's caption
    cut_at_member = members[4].offset  # right before sample 2's image: no end-of-archive block
    (inputs / "00001.tar").write_bytes(data[:cut_in_data])
    (inputs / "00002.tar").write_bytes(b"\x00garbage" * 100)
    (inputs / "00003.tar").write_bytes(tar_bytes(samples(3))[:cut_at_member])
    write_wds_input(inputs / "00004.tar", samples(4)[:3] + [{"__key__": "40003", "jpg": b"not a jpeg",
                                                             "txt": b"item 43 caption 0"}])
    manifest = prep_wds(input=str(inputs / "{00000..00004}.tar"), output=tmp_path / "out", shard_size=4, workers=1,
                        shuffle=False)
    kept = [id_of_image(s["image"]) for s in read_dataset(tmp_path / "out")]
    # 00001: samples 0-2 are whole before the cut; 00003: sample 1 is whole, but the stream ends without an
    # end-of-archive block in sample 2's place, so the sample in hand when the damage shows is not trusted
    assert kept == [0, 1, 2, 3, 4, 10, 11, 12, 30, 40, 41, 42]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    reasons = {Path(r["shard"]).name: r["reason"] for r in rejected}
    assert reasons["00001.tar"].startswith("damaged input shard: ") and "00001.tar" in reasons["00001.tar"]
    assert "truncated or damaged" in reasons["00001.tar"] and "truncated or damaged" in reasons["00002.tar"]
    assert "no end-of-archive block" in reasons["00003.tar"]
    assert reasons["00004.tar"].startswith("undecodable image")
    assert all(r["key"] is None for r in rejected[:3]) and len(rejected) == 4
    assert manifest.accepted + manifest.rejected == manifest.source["rows"] == 12 + 4
