"""Faults a cluster inflicts, each struck on purpose: whatever happens, the last complete checkpoint is intact
and resuming from it gives exactly the run that was never interrupted. (bench/faults.py repeats these at
random points for the README's figures.)"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from clip_dro.checkpoint import resolve_resume
from test_trainer import TINY, assert_same_checkpoint, overrides

TESTS = Path(__file__).resolve().parent
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_prep.synthetic import prep_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    prep_synthetic(output=root, num_train=480, seed=0, workers=1)
    return root


def args(data: Path, out: Path, **extra) -> list[str]:
    base = {"data.workers": 1, "train.max_steps": STEPS, "train.checkpoint_every": 2}
    return ["train", "--config", str(TINY)] + overrides(data, out, **{**base, **extra})


def command(cli_args: list[str], nproc: int = 1, fault: tuple[Path, str] | None = None) -> list[str]:
    entry = [str(TESTS / "fault_driver.py"), str(fault[0]), fault[1]] if fault else ["-m", "clip_dro.cli"]
    if nproc == 1:
        return [sys.executable, *entry, *cli_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *entry, *cli_args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Weights, per-sample state (every τ and s) and optimizer state equal the uninterrupted run's."""
    assert_same_checkpoint(reference, resumed)
    oa, ob = torch.load(reference / "optimizer.bin"), torch.load(resumed / "optimizer.bin")
    for key, state in oa["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, ob["state"][key][name], atol=0, rtol=0, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted runs, at 1 and 2 processes."""
    root = tmp_path_factory.mktemp("reference")
    finish(command(args(data, root / "one")))
    finish(command(args(data, root / "two", **{"data.batch_size": 8, "data.lanes": 2}), nproc=2))
    return {1: root / "one", 2: root / "two"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill9_during_training_then_resume_is_the_uninterrupted_run(data, reference, tmp_path, nproc):
    extra = {"data.batch_size": 8, "data.lanes": 2} if nproc == 2 else {}
    run_dir = tmp_path / "run"
    proc = start(command(args(data, run_dir, **extra), nproc=nproc))
    wait_for(lambda: logged_step(run_dir) >= 5, "step 5")
    victims = psutil.Process(proc.pid).children() if nproc == 2 else [psutil.Process(proc.pid)]
    victims[-1].kill()  # one training process (for two: the last rank; torchrun then stops the other)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert resolve_resume("latest", run_dir).name in {"step-4", "step-6"}
    finish(command(args(data, run_dir, **extra, **{"train.resume": "latest"}), nproc=nproc))
    assert_same_run(reference[nproc] / "final", run_dir / "final")
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must read as one run"


def test_kill9_inside_a_checkpoint_write_leaves_the_previous_one(data, reference, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    proc = start(command(args(data, run_dir), fault=(marker, "checkpoint:4")))
    wait_for(marker.exists, "the checkpoint write")
    proc.kill()
    proc.communicate(timeout=60)
    assert (run_dir / "checkpoints/step-4.tmp").is_dir() and not (run_dir / "checkpoints/step-4").exists()
    assert resolve_resume("latest", run_dir) == run_dir / "checkpoints/step-2"
    finish(command(args(data, run_dir, **{"train.resume": "latest"})))
    assert_same_run(reference[1] / "final", run_dir / "final")
    assert not (run_dir / "checkpoints/step-4.tmp").exists()


def copy_checkpoint(reference_run: Path, step: int, run_dir: Path) -> None:
    """A run directory as the reference run left it at ``step``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / f"checkpoints/step-{step}", run_dir / f"checkpoints/step-{step}")
    lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step))


def test_disk_full_while_checkpointing_is_one_line_and_resumable(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    copy_checkpoint(reference[1], 2, run_dir)
    limit = 1 << 20  # 1 MiB per file: the optimizer state of the next checkpoint does not fit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(command(args(data, run_dir, **{"train.resume": "latest"})), env=ENV,
                          capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "clip-dro train: error:" in x]
    assert f"cannot write checkpoint {run_dir / 'checkpoints/step-4'}" in line and "File too large" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    finish(command(args(data, run_dir, **{"train.resume": "latest"})))
    assert_same_run(reference[1] / "final", run_dir / "final")


def test_sigterm_during_evaluation_checkpoints_and_exits_130(data, reference, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    evaluated = {"train.eval_every": 4, "eval.retrieval": f"[{data / 'retrieval'}]"}
    proc = start(command(args(data, run_dir, **evaluated), fault=(marker, "eval")))
    wait_for(marker.exists, "the evaluation")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted at step 4" in out and resolve_resume("latest", run_dir) == run_dir / "checkpoints/step-4"
    finish(command(args(data, run_dir, **evaluated, **{"train.resume": "latest"})))
    assert_same_run(reference[1] / "final", run_dir / "final")


def test_sigterm_in_the_first_step_after_resume(data, reference, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    copy_checkpoint(reference[1], 4, run_dir)
    proc = start(command(args(data, run_dir, **{"train.resume": "latest"}), fault=(marker, "first-step")))
    wait_for(marker.exists, "the first step")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert resolve_resume("latest", run_dir) == run_dir / "checkpoints/step-5", "the step in flight completes"
    finish(command(args(data, run_dir, **{"train.resume": "latest"})))
    assert_same_run(reference[1] / "final", run_dir / "final")


def test_second_run_on_one_output_dir_is_refused_until_the_first_dies(data, reference, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    first = start(command(args(data, run_dir), fault=(marker, "step:3")))
    wait_for(marker.exists, "the first run's step 3")
    second = subprocess.run(command(args(data, run_dir, **{"train.resume": "latest"})), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"train.output_dir {run_dir} is in use" in second.stderr
    first.kill()  # a crash: the lock must not outlive it
    first.communicate(timeout=60)
    finish(command(args(data, run_dir, **{"train.resume": "latest"})))
    assert_same_run(reference[1] / "final", run_dir / "final")


def test_survivor_of_a_dead_peer_exits_with_one_line(data, tmp_path):
    """Two processes started by hand (no launcher to tear the group down): rank 1 is killed, rank 0 must
    stop on its own within train.collective_timeout_s, with one line."""
    run_dir, port = tmp_path / "run", free_port()
    cli_args = args(data, run_dir, **{"data.batch_size": 8, "data.lanes": 2, "train.max_steps": 40,
                                      "train.checkpoint_every": 0, "train.collective_timeout_s": 20})
    ranks = [start([sys.executable, "-m", "clip_dro.cli", *cli_args],
                   env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    wait_for(lambda: logged_step(run_dir) >= 3, "step 3")
    killed_at = time.time()
    ranks[1].kill()
    out, err = ranks[0].communicate(timeout=120)
    assert time.time() - killed_at < 20 + 30, "the survivor waited past the collective timeout"
    assert ranks[0].returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if "clip-dro train: error:" in x]
    assert "another process died or stopped answering" in line
