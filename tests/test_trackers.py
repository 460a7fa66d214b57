"""train.report_to: metrics.jsonl, TensorBoard and W&B through accelerate's trackers; a resumed run continues
its tracker runs; a missing tracker package is a one-line error naming the extra."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import accelerate.tracking
import pytest
from accelerate.utils import LoggerType

from clip_dro.bench import launch
from clip_dro.cli import main
from clip_dro.config import ConfigError, load_config
from clip_dro.errors import UserError
from clip_dro.trackers import RUNS_FILE, dashboard_scalars, read_runs, write_runs
from test_trainer import TINY, overrides, run


def _killed_after_checkpoint(run_dir: Path, step: int) -> None:
    """What a run killed just after writing checkpoint ``step`` leaves behind: no later checkpoint, no final."""
    shutil.rmtree(run_dir / "final")
    for later in (run_dir / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)


def _stopped_and_resumed(data: Path, run_dir: Path, report_to: str) -> None:
    """Six steps with checkpoints at 3 and 6, killed after step 3's, then resumed with train.resume=latest."""
    run(data, run_dir, **{"train.report_to": report_to})
    _killed_after_checkpoint(run_dir, 3)
    run(data, run_dir, **{"train.report_to": report_to, "train.resume": "latest"})


def _jsonl_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_report_to_is_a_checked_list_with_jsonl_by_default():
    assert load_config(TINY).train.report_to == ["jsonl"]
    assert load_config(TINY, ["train.report_to=wandb"]).train.report_to == ["wandb"]
    with pytest.raises(ConfigError, match=r"^train.report_to\[1\]: 'mlflow' is not one of jsonl, tensorboard, wandb$"):
        load_config(TINY, ["train.report_to=[jsonl,mlflow]"])
    with pytest.raises(ConfigError, match=r"^train.report_to: \['wandb', 'wandb'\] names a tracker twice$"):
        load_config(TINY, ["train.report_to=[wandb,wandb]"])


def test_dashboards_get_numbers_with_evaluations_under_their_dataset():
    assert dashboard_scalars({"step": 4, "loss": 0.5, "lr": 1e-3}) == {"loss": 0.5, "lr": 1e-3}
    assert dashboard_scalars({"step": 4, "skipped_samples": 2, "skipped_examples": ["a/1"]}) == {"skipped_samples": 2}
    record = {"step": 4, "eval": "retrieval", "dataset": "coco", "r_mean": 50.0, "skipped_images": 0}
    assert dashboard_scalars(record) == {"eval/coco/r_mean": 50.0, "eval/coco/skipped_images": 0}


@pytest.mark.parametrize("name", ["wandb", "tensorboard"])
def test_missing_tracker_package_is_one_line_naming_the_extra(data, tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)  # an import of it fails, installed or not
    code = main(["train", "--config", str(TINY)] + overrides(data, tmp_path / "run", **{
        "train.report_to": f"[jsonl,{name}]", "data.workers": 1}))
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [
        f"clip-dro train: error: train.report_to: {name} needs the {name} package: pip install clip-dro[{name}]"]
    assert not (tmp_path / "run/metrics.jsonl").exists(), "work started before the check"


@pytest.mark.slow
def test_two_process_cli_runs_resume_with_report_to_changed(data, tmp_path):
    """`clip-dro train` at two processes with a loader worker: a run logging nowhere (`[]`), killed after its
    step-3 checkpoint, resumes logging to metrics.jsonl from step 4 (report_to may change on resume); a
    metrics.jsonl run resumed the same way reads as one run, the stopped run's later lines replaced."""
    def train(run_dir: Path, report_to: str, *extra: str) -> None:
        args = ["train", "--config", str(TINY)] + overrides(data, run_dir, **{
            "train.report_to": report_to, "data.batch_size": 8, "data.workers": 1}) + list(extra)
        done = launch.run(args, nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]

    for run_dir, first in ((tmp_path / "silent", "[]"), (tmp_path / "jsonl", "[jsonl]")):
        train(run_dir, first)
        assert (run_dir / "metrics.jsonl").exists() == (first == "[jsonl]")
        _killed_after_checkpoint(run_dir, 3)
        train(run_dir, "[jsonl]", "train.resume=latest")
        assert not (run_dir / "final" / RUNS_FILE).exists(), "nothing to continue for metrics.jsonl alone"
    assert _jsonl_steps(tmp_path / "silent") == [4, 5, 6]
    assert _jsonl_steps(tmp_path / "jsonl") == [1, 2, 3, 4, 5, 6]


class _StandInRun:
    """What accelerate's WandBTracker uses of a wandb run."""

    def __init__(self, calls: list, **kwargs):
        self.id = kwargs.get("id") or f"run{len(calls)}"
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, values: dict, step: int) -> None:
        self.calls.append(("log", step, values))

    def finish(self) -> None:
        self.calls.append(("finish",))


@pytest.mark.slow
def test_resumed_run_continues_its_wandb_run_id_through_accelerate(data, tmp_path, monkeypatch):
    """accelerate's own WandBTracker against a stand-in wandb module (the real one, offline, is tested below
    where installed): the id recorded in the checkpoint goes back to wandb.init with resume="allow"."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: _StandInRun(calls, **kw)))
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.WANDB])
    run_dir = tmp_path / "run"
    _stopped_and_resumed(data, run_dir, "[jsonl,wandb]")
    inits = [call[1] for call in calls if call[0] == "init"]
    assert len(inits) == 2 and "id" not in inits[0] and inits[1]["id"] == "run0"
    assert all(i["resume"] == "allow" and i["project"] == "clip_dro" and i["dir"] == str(run_dir) for i in inits)
    assert inits[0]["config"]["train"]["report_to"] == ["jsonl", "wandb"]
    assert json.loads((run_dir / "checkpoints/step-3" / RUNS_FILE).read_text()) == {"wandb": "run0"}
    assert json.loads((run_dir / "final" / RUNS_FILE).read_text()) == {"wandb": "run0"}
    second = calls[[c[0] for c in calls].index("init", 1):]
    assert [c[1] for c in second if c[0] == "log"] == [4, 5, 6], "the resumed run logs from the step after 3"
    assert second[-1] == ("finish",)


@pytest.mark.slow
def test_wandb_offline_resumed_run_keeps_its_id(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    run_dir = tmp_path / "run"
    _stopped_and_resumed(data, run_dir, "[jsonl,wandb]")
    run_id = json.loads((run_dir / "checkpoints/step-3" / RUNS_FILE).read_text())["wandb"]
    assert json.loads((run_dir / "final" / RUNS_FILE).read_text())["wandb"] == run_id
    # the first run and the resumed one: two offline segments of one W&B run
    assert len(list((tmp_path / "wandb_dir/wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert _jsonl_steps(run_dir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_tensorboard_events_read_back_as_one_run_after_resume(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _stopped_and_resumed(data, run_dir, "[jsonl,tensorboard]")
    logdir = json.loads((run_dir / "final" / RUNS_FILE).read_text())["tensorboard"]
    assert logdir == json.loads((run_dir / "checkpoints/step-3" / RUNS_FILE).read_text())["tensorboard"]
    assert Path(logdir) == run_dir / "tensorboard/clip_dro" and len(list(Path(logdir).glob("events.out.*"))) == 2
    events = EventAccumulator(logdir)
    events.Reload()
    # steps 4-6 of the stopped run are purged by the resumed one's: every step once, in order
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(m["step"], m["loss"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    for (_, got), (_, want) in zip(losses, expected):
        assert got == pytest.approx(want, rel=1e-6)  # TensorBoard stores float32


def test_tracker_record_of_a_checkpoint_read_back_or_refused_in_one_line(tmp_path):
    assert read_runs(None) == {} and read_runs(tmp_path) == {}, "checkpoints from before trackers.json"
    write_runs(tmp_path, {"wandb": "abc123", "tensorboard": "/runs/x/tensorboard/clip_dro"})
    assert read_runs(tmp_path) == {"wandb": "abc123", "tensorboard": "/runs/x/tensorboard/clip_dro"}
    (tmp_path / RUNS_FILE).write_text('{"wandb": ')
    with pytest.raises(UserError, match=r"trackers.json is damaged \(JSONDecodeError: .*\); delete it"):
        read_runs(tmp_path)
    (tmp_path / RUNS_FILE).write_text('["abc123"]')
    with pytest.raises(UserError, match="not a mapping of tracker names to run ids"):
        read_runs(tmp_path)
