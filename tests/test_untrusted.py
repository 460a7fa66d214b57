"""Data from others cannot run commands, escape its directory, race another writer or crash with a traceback
(docs/design.md §9). The property tests at the end generate hostile manifests, shards, tables and
config overrides and count the outcomes (printed at the end of the module: ``pytest -s``)."""
import collections
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip_dro import manifest as manifest_module
from clip_dro.cli import main
from clip_dro.config import load_config
from clip_dro.data.shard_reader import MAX_OTHER_MEMBER_BYTES, DamagedTar, raw_sample, shard_samples
from clip_dro.errors import UserError
from clip_dro.manifest import (LocationError, Manifest, ShardInfo, UnsafeNameError, join_location, load_manifest,
                               read_location)
from clip_dro.resources import resolve_config_path
from datagen import image_bytes, write_images

HOSTILE_NAMES = ["shard-000000.tar; touch PWNED; echo", "/etc/passwd", "../outside.tar", "a/b.tar", "..", ".",
                 ".hidden.tar", "-rf", "$(touch PWNED).tar", "`touch PWNED`.tar", "a b.tar", "a\nb.tar",
                 "shard\x00.tar", "sh\u00e4rd.tar", "", "x" * 256, "x|y.tar", "x&y.tar", "x>y.tar", "~root", "x..tar",
                 5, None, ["shard-000000.tar"]]
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def prep_csv(table: Path, output: Path, *extra: str) -> list[str]:
    return ["prep", "csv", "--input", str(table), "--output", str(output), "--image-col", "image",
            "--caption-col", "caption", "--image-root", str(table.parent / "images"), "--workers", "1", *extra]


@pytest.fixture(scope="module")
def table(module_tmp) -> Path:
    """Twelve images with two captions each, as a CSV."""
    root = module_tmp("table")
    names = write_images(root / "images", range(12))
    rows = [(names[i], f"item {i} caption {j}") for i in range(12) for j in range(2)]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(root / "pairs.csv", index=False)
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def prepped(table, module_tmp) -> Path:
    out = module_tmp("prepped") / "train"
    assert main(prep_csv(table, out, "--shard-size", "4")) == 0
    return out


def with_manifest(prepped: Path, directory: Path, edit) -> Path:
    """A copy of ``prepped`` whose manifest went through ``edit`` (a function of the manifest dict)."""
    directory.mkdir(parents=True)
    for path in prepped.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    data = json.loads((prepped / "manifest.json").read_text())
    edit(data)
    (directory / "manifest.json").write_text(json.dumps(data))
    return directory


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"clip-dro {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_hostile_shard_name_never_reaches_the_shell(prepped, tmp_path, capsys, monkeypatch):
    """The reported hole: with data.train='pipe:cat DIR/{name}', a shard named 'x; touch PWNED; echo' ran
    ``touch PWNED`` and training reported success. Now the manifest is refused, naming the entry."""
    monkeypatch.chdir(tmp_path)
    hostile = with_manifest(prepped, tmp_path / "hostile",
                            lambda m: m["shards"][0].update(name="shard-000000.tar; touch PWNED; echo"))
    code = main(["train", "--config", "tiny_cpu", f"data.train=pipe:cat {hostile}/{{name}}", "data.batch_size=4",
                 "eval.retrieval=[]", "eval.zeroshot=[]", "train.max_steps=1", f"train.output_dir={tmp_path}/run"])
    line = one_line_error(capsys, "train")
    assert code == 2 and "manifest.json: shards[0].name" in line and "not a plain file name" in line, line
    assert not (tmp_path / "PWNED").exists() and not (hostile / "PWNED").exists()


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_manifest_names_are_plain_file_names(prepped, tmp_path, name):
    hostile = with_manifest(prepped, tmp_path / "d", lambda m: m["shards"][1].update(name=name))
    with pytest.raises(UserError) as error:
        load_manifest(hostile)
    message = str(error.value)
    assert "\n" not in message and f"{hostile / 'manifest.json'}: shards[1]" in message, message
    with pytest.raises(UserError):
        load_manifest(f"pipe:cat {hostile}/{{name}}")
    if isinstance(name, str):
        with pytest.raises(UnsafeNameError, match=r"shards\[0\]\.name"):  # and on write
            Manifest(1, 1, 1, [ShardInfo(name, 1, 0)], {}, 1, 0).write(tmp_path)


def test_pipe_commands_quote_names_as_well(tmp_path, monkeypatch):
    """Defence in depth: were a hostile name to pass the check, the shell would still see one quoted word."""
    monkeypatch.chdir(tmp_path)
    assert join_location("pipe:cat /d/{name}", "shard-000001.tar") == "pipe:cat /d/shard-000001.tar"
    monkeypatch.setattr(manifest_module, "is_plain_name", lambda name: True)
    location = join_location(f"pipe:cat {tmp_path}/{{name}}", "x; touch PWNED")
    assert location == f"pipe:cat {tmp_path}/{shlex.quote('x; touch PWNED')}"
    with pytest.raises(LocationError, match="exited with status 1"):
        read_location(location)
    assert not (tmp_path / "PWNED").exists()


def test_a_progress_log_cannot_name_files_outside_its_directory(table, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    header = {"progress_version": 1, "kind": "train", "source": {}}
    record = {"name": "../victim.tar", "num_samples": 1, "first_index": 0, "bytes": 0, "consumed": 1,
              "cursor": None, "index": 1, "num_texts": 1, "accepted": 1, "rejected": 0, "rejected_bytes": 0}
    (out / "prep-progress.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(record) + "\n")
    (tmp_path / "victim.tar").write_bytes(b"precious")
    assert main(prep_csv(table, out)) == 2
    assert "prep-progress.jsonl: line 2: name" in one_line_error(capsys, "prep")
    assert (tmp_path / "victim.tar").read_bytes() == b"precious"


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clip_dro.run_lock import lock_prep_dir
    handle = lock_prep_dir(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def test_one_writer_per_prep_directory_and_kill_9_still_resumes(table, prepped, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(prep_csv(table, out, "--shard-size", "4")) == 2
        line = one_line_error(capsys, "prep")
        assert f"output {out} is being written by another prep" in line and f"pid {holder.pid}" in line, line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(prep_csv(table, out, "--shard-size", "4")) == 0  # the kernel released the dead holder's lock
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in prepped.iterdir()}


@pytest.mark.slow
def test_two_preps_into_one_directory_never_mix(table, prepped, tmp_path):
    """The reported race (a re-queued job while the first still runs): each run either writes the whole
    output, finds it done, or is refused in one line; the directory is one run's output."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "clip_dro.cli", *prep_csv(table, out, "--shard-size", "4")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and "is being written by another prep" in err.strip().splitlines()[-1]), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in prepped.iterdir()}


def tar_with_claimed_size(path: Path, claimed: int) -> None:
    """A tar whose caption member claims ``claimed`` bytes (only its first block is there, as in a shard cut
    short or forged), after a valid image and .json."""
    with open(path, "wb") as out:
        for name, data in (("000000000.jpg", image_bytes(0)),
                           ("000000000.json", b'{"index": 0, "image_index": 0, "text_index": [0]}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        info = tarfile.TarInfo("000000000.txt")
        info.size = claimed
        out.write(info.tobuf(format=tarfile.GNU_FORMAT) + b"a caption\n".ljust(512, b"x") + bytes(1024))


def test_a_member_too_large_to_hold_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "in" / "00000.tar"
    huge.parent.mkdir()
    tar_with_claimed_size(huge, 10 << 30)
    with pytest.raises(DamagedTar, match=r"member 000000000.txt holds 10737418240 bytes, more than the \d+"):
        list(shard_samples(huge, ShardInfo("00000.tar", 1, 0)))
    # A real member just over the bound, too (not only a forged header).
    over = tmp_path / "over.tar"
    with tarfile.open(over, "w") as tar:
        info = tarfile.TarInfo("000000000.txt")
        info.size = MAX_OTHER_MEMBER_BYTES + 1
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(DamagedTar, match="more than the"):
        list(shard_samples(over, ShardInfo("over.tar", 1, 0)))
    # prep wds over someone's shards: the damaged shard is a rejected row, never the end of the run.
    assert main(["prep", "wds", "--input", str(huge), "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and "holds 10737418240 bytes, more than the" in rejected[0]["reason"], rejected


def test_a_table_cannot_make_prep_read_without_end(tmp_path):
    """Image paths from someone's table naming /dev/zero, a FIFO or a directory are rejected rows (read whole,
    /dev/zero filled the memory until the kernel killed prep)."""
    write_images(tmp_path / "images", range(1))
    os.mkfifo(tmp_path / "images" / "fifo.jpg")
    rows = [("img_000.jpg", "fine"), ("/dev/zero", "endless"), ("fifo.jpg", "waits"), (".", "a directory")]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(tmp_path / "pairs.csv", index=False)
    assert main(prep_csv(tmp_path / "pairs.csv", tmp_path / "out")) == 0
    reasons = {json.loads(line)["caption"]: json.loads(line)["reason"]
               for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()}
    assert load_manifest(tmp_path / "out").num_samples == 1 and set(reasons) == {"endless", "waits", "a directory"}
    assert all("not a regular file" in reason for reason in reasons.values()), reasons


def test_a_foreign_shard_count_costs_one_lookup(tmp_path):
    """CLIP_benchmark's nshards.txt comes with someone's set: a count of 10**12 is refused at the first gap,
    not after building a list of 10**12 paths."""
    from clip_dro.data.benchmark_sets import open_zeroshot_set
    from clip_dro.data.eval_sets import EvalSetError

    (tmp_path / "test").mkdir()
    (tmp_path / "classnames.txt").write_text("cat\n")
    (tmp_path / "test" / "0.tar").write_bytes(bytes(1024))
    (tmp_path / "test" / "nshards.txt").write_text(str(10 ** 12))
    with pytest.raises(EvalSetError, match=r"nshards.txt lists 1000000000000 shards but .*1.tar does not exist"):
        open_zeroshot_set(tmp_path)


def test_a_damaged_torchscript_archive_is_one_line(tmp_path):
    import zipfile

    from clip_dro.evaluation.any_model import load_any_model

    with zipfile.ZipFile(tmp_path / "fake.pt", "w") as archive:
        archive.writestr("fake/constants.pkl", b"not a pickle")
    with pytest.raises(UserError, match="cannot read the TorchScript archive") as error:
        load_any_model("tiny-vit", pretrained=str(tmp_path / "fake.pt"))
    assert "\n" not in str(error.value)


class _Evil:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_weights_from_others_load_without_running_code(tmp_path, monkeypatch, capsys):
    from clip_dro.models import build_model

    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        build_model("tiny-vit", pretrained=str(tmp_path / "evil.pt"))
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------- properties

def outcome(kind: str, call) -> None:
    """Run ``call``: success, or a UserError whose message is one line; anything else fails the test."""
    try:
        call()
    except UserError as exc:
        assert "\n" not in str(exc).strip(), repr(str(exc))
        OUTCOMES[kind][f"error: {type(exc).__name__}"] += 1
    else:
        OUTCOMES[kind]["success"] += 1


def tree_outside(root: Path, case: Path) -> set[str]:
    """Every path under ``root`` but those in ``case``."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if case not in p.parents}


@pytest.fixture()
def sandbox(tmp_path_factory, monkeypatch):
    """A fresh directory as the working directory, and every subprocess started recorded."""
    started = []
    real = subprocess.Popen.__init__

    def recording(self, args, *a, **k):
        started.append(args)
        real(self, args, *a, **k)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording)
    root = tmp_path_factory.mktemp("sandbox")
    monkeypatch.chdir(root)
    return root, started


odd_text = st.lists(st.sampled_from(list("ab.-_/\\;|&$`'\" \n\t\x00\x1b\u00e4\u2028{}*?~") + ["..", "shard-000000.tar"]),
                    max_size=12).map("".join)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                        odd_text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(odd_text, inner, max_size=3)),
                          max_leaves=8)
MANIFEST_KEYS = ["format_version", "num_samples", "num_images", "num_texts", "shards", "source", "accepted",
                 "rejected", "kind", "extra"]


@st.composite
def manifests(draw, real: dict):
    data = dict(real)
    for key in draw(st.lists(st.sampled_from(MANIFEST_KEYS), max_size=2, unique=True)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(json_value)
    if draw(st.booleans()) and isinstance(data.get("shards"), list) and data["shards"]:
        shard = dict(data["shards"][0]) if isinstance(data["shards"][0], dict) else {}
        shard[draw(st.sampled_from(["name", "num_samples", "first_index"]))] = draw(json_value)
        data["shards"] = [shard, *data["shards"][1:]]
    return draw(st.one_of(st.just(json.dumps(data).encode()), st.binary(max_size=64)))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_hostile_manifests(prepped, sandbox, data):
    root, started = sandbox
    started.clear()  # the fixture lives across examples
    real = json.loads((prepped / "manifest.json").read_text())
    directory = root / f"m{len(list(root.iterdir()))}"
    directory.mkdir()
    for path in prepped.glob("*.tar"):
        (directory / path.name).symlink_to(path)
    (directory / "manifest.json").write_bytes(data.draw(manifests(real)))
    location = data.draw(st.sampled_from([str(directory), f"pipe:cat {directory}/{{name}}"]))
    before = tree_outside(root, root / "none")

    def read_everything():
        manifest = load_manifest(location)
        for info, shard in zip(manifest.shards, manifest.shard_locations(location)):
            for _, key, members in shard_samples(shard, info):
                raw_sample(shard, key, members, manifest.num_images, manifest.num_texts)

    outcome("manifest", read_everything)
    assert tree_outside(root, root / "none") == before
    for args in started:  # only the user's own command, with a plain file name in place of {name}
        assert isinstance(args, str) and args.startswith(f"cat {directory}/"), args
        assert manifest_module.is_plain_name(args[len(f"cat {directory}/"):]), args


member_names = st.sampled_from(["000000000", "000000001", "x", "../evil", "/abs", "000000000.a"])
member_exts = st.sampled_from(["jpg", "png", "txt", "json", "cls", "TXT", "weird"])
member_bytes = st.one_of(st.binary(max_size=64), st.just(image_bytes(1)), st.just(b"\xff\xfe caption"),
                         st.just(b"[1, 2]"), st.just(json.dumps({"index": 0, "image_index": 0, "text_index": [0]}).encode()),
                         st.just(b"caption " * 12_500))  # 100 kB


@st.composite
def hostile_tars(draw) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for _ in range(draw(st.integers(0, 6))):
            data = draw(member_bytes)
            info = tarfile.TarInfo(f"{draw(member_names)}.{draw(member_exts)}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, max(len(raw) - 1, 0))))
    return raw if cut is None else raw[:cut]


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shard=hostile_tars(), huge=st.booleans())
def test_property_hostile_shards(sandbox, shard, huge):
    """Someone's shards, read by ``prep wds`` (as an img2dataset download is) and as training shards."""
    root, started = sandbox
    case = root / f"s{len(list(root.iterdir()))}"
    case.mkdir()
    path = case / "00000.tar"
    if huge:
        tar_with_claimed_size(path, 10 << 30)
    else:
        path.write_bytes(shard)
    before = tree_outside(root, case)

    def read_as_training_shard():
        for _, key, members in shard_samples(path, ShardInfo("00000.tar", 2, 0)):
            raw_sample(path, key, members, 2, 2)

    outcome("shard (training reader)", read_as_training_shard)
    code = main(["prep", "wds", "--input", str(path), "--output", str(case / "out"), "--workers", "1"])
    assert code in (0, 2)
    kept = code == 0 and load_manifest(case / "out").num_samples > 0
    OUTCOMES["shard (prep wds)"]["error: one line" if code else "success, samples kept" if kept else
                                 "success, every row rejected"] += 1
    assert tree_outside(root, case) == before and started == []


cells = st.one_of(st.none(), st.just(""), st.just("img_000.jpg"), st.just("img_001.jpg"), st.just("../../etc/passwd"),
                  st.just("/dev/zero"), st.just("missing.jpg"), st.just("x" * 100_000), odd_text,
                  st.binary(max_size=16).map(lambda b: b.decode("latin-1")), st.integers(-5, 5), st.floats())


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(columns=st.one_of(st.just(["image", "caption"]), st.just(["caption", "other", "image"]),
                        st.lists(st.sampled_from(["image", "caption", "other", ""]), min_size=1, max_size=3,
                                 unique=True)),
       rows=st.lists(st.tuples(cells, cells, cells), max_size=6),
       fmt=st.sampled_from([".csv", ".tsv", ".parquet", ".jsonl"]), garbage=st.booleans())
def test_property_hostile_tables(table, sandbox, columns, rows, fmt, garbage):
    root, started = sandbox
    case = root / f"t{len(list(root.iterdir()))}"
    (case / "images").mkdir(parents=True)
    write_images(case / "images", range(2))
    path = case / f"pairs{fmt}"
    frame = pd.DataFrame([dict(zip(columns, row)) for row in rows], columns=columns)
    if garbage:
        path.write_bytes(b"\x00\xff\x00 not a table \xfe")
    elif fmt == ".parquet":
        frame.astype(str).to_parquet(path)
    elif fmt == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, sep="," if fmt == ".csv" else "\t", index=False)
    before = tree_outside(root, case)
    code = main(prep_csv(path, case / "out"))
    assert code in (0, 2)
    label = "error: one line"
    if code == 0:
        manifest = load_manifest(case / "out")
        assert manifest.accepted + manifest.rejected == len(rows) and not garbage
        label = "success, samples kept" if manifest.num_samples else "success, every row rejected"
    OUTCOMES["table (prep csv)"][label] += 1
    assert tree_outside(root, case) == before and started == []


CONFIG_KEYS = ["model.name", "model.pretrained", "data.train", "data.batch_size", "data.workers", "data.lanes",
               "train.max_steps", "train.lr", "train.precision", "train.resume", "eval.retrieval", "loss.name",
               "loss.rho", "loss.tau_min", "loss.gamma", "loss.nonexistent", "nonexistent", "train", "loss.rho.x"]
yaml_values = st.one_of(st.sampled_from(["8", "2", "0.5", "1.5", "null", "-1", "0", "1e400", "nan", ".inf", "-.inf", "[]", "{}", "[1, [2]]",
                                         "{a: 1}", "'x'", "true", "99999999999999999999999", "!!binary aGk=",
                                         "&a [*a]", "'", "a: b: c", "\x00", "fp32", "isogclr"]), odd_text)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(overrides=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), yaml_values), max_size=3))
def test_property_hostile_config_overrides(sandbox, overrides):
    outcome("config override", lambda: load_config(resolve_config_path("tiny_cpu"), [f"{k}={v}" for k, v in overrides]))


def test_zz_outcome_counts():
    """The counts the README's bad-input table reports (run with -s to see them)."""
    if not OUTCOMES:
        pytest.skip("run with the property tests")
    print("\n" + json.dumps({kind: dict(counts) for kind, counts in sorted(OUTCOMES.items())}, indent=1))
    assert all(sum(counts.values()) > 0 for counts in OUTCOMES.values())
