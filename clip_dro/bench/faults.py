"""Fault scenarios on the tiny setup, shared by bench/faults.py (many strikes at random points, for the
README's table) and tests/test_faults.py (one strike each, at fixed points).

Every scenario strikes a training run and then checks the promise: the last complete checkpoint is intact,
and resuming from it gives exactly the uninterrupted run (weights, optimizer state, every τ and s). A broken
promise is an AssertionError saying what was lost.
"""
from __future__ import annotations

import io
import json
import resource
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from clip_dro.bench import launch
from clip_dro.checkpoint import read_loss_state, resolve_resume
from clip_dro.resources import CONFIGS_DIR

TINY = CONFIGS_DIR / "tiny_cpu.yaml"
STEPS = 8
CHECKPOINT_EVERY = 2
FAULT_DRIVER = ["-m", "clip_dro.bench.fault_driver"]
TWO_PROCESSES = {"data.batch_size": 8, "data.lanes": 2}


def prep_data(root: Path) -> Path:
    from data_prep.synthetic import prep_synthetic

    prep_synthetic(output=root, num_train=480, seed=0, workers=1)
    return root


def args(data: Path, out: Path, **extra) -> list[str]:
    settings = {"data.train": data / "train", "data.batch_size": 16, "data.workers": 1, "data.lanes": 2,
                "train.max_steps": STEPS, "train.warmup_steps": 2, "train.checkpoint_every": CHECKPOINT_EVERY,
                "train.log_every": 1, "train.output_dir": out, "eval.retrieval": "[]", "eval.zeroshot": "[]",
                "loss.tau_warmup_steps": 0, "loss.tau_min": 0.01, "loss.tau_init": 0.05, **extra}
    return ["train", "--config", str(TINY)] + [f"{k}={v}" for k, v in settings.items()]


def command(cli_args: list[str], nproc: int = 1, fault: Optional[tuple[Path, str]] = None) -> list[str]:
    """``clip-dro`` (or the fault driver holding a window open) in one process or under torchrun."""
    entry = [*FAULT_DRIVER, str(fault[0]), fault[1]] if fault else None
    return launch.command(cli_args, nproc, entry)


def start(cmd: list[str], env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env or launch.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(cli_args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    proc = launch.run(cli_args, nproc)
    assert proc.returncode == 0, f"the resumed run failed: {proc.stderr[-3000:]}"
    return proc


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, f"a traceback reached the user: {stderr[-3000:]}"
    lines = [x for x in stderr.splitlines() if "clip-dro train: error:" in x]
    assert len(lines) == 1, f"expected one error line: {stderr[-3000:]}"
    return lines[0]


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Weights, per-sample state (every τ and s) and optimizer state equal the uninterrupted run's, exactly."""
    for name, read in (("model.pt", lambda d: torch.load(d / "model.pt")), ("loss state", read_loss_state)):
        a, b = read(reference), read(resumed)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs from the uninterrupted run"
    oa, ob = torch.load(reference / "optimizer.bin"), torch.load(resumed / "optimizer.bin")
    for key, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ob["state"][key][name]), f"optimizer state {key}.{name} differs"
    steps = [json.loads(x)["step"] for x in (resumed.parent / "metrics.jsonl").read_text().splitlines()
             if "eval" not in json.loads(x)]
    assert sorted(steps) == list(range(1, STEPS + 1)), f"metrics.jsonl does not read as one run: steps {steps}"


def reference_runs(data: Path, root: Path) -> dict[int, Path]:
    """The uninterrupted runs at 1 and 2 processes (their run directories)."""
    finish(args(data, root / "one"))
    finish(args(data, root / "two", **TWO_PROCESSES), nproc=2)
    return {1: root / "one", 2: root / "two"}


def copy_checkpoint(reference_run: Path, step: int, run_dir: Path) -> None:
    """A run directory as the reference run left it at ``step``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / f"checkpoints/step-{step}", run_dir / f"checkpoints/step-{step}")
    lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step))


def resume_and_compare(data: Path, reference: dict[int, Path], run_dir: Path, nproc: int = 1, **extra) -> None:
    """Resume ``run_dir``'s latest checkpoint to the end; the result must be the uninterrupted run's."""
    more = TWO_PROCESSES if nproc == 2 else {}
    finish(args(data, run_dir, **more, **extra, **{"train.resume": "latest"}), nproc=nproc)
    assert_same_run(reference[nproc] / "final", run_dir / "final")


# -- the faults --------------------------------------------------------------------------------------------

def kill9_during_training(data: Path, reference: dict[int, Path], run_dir: Path, nproc: int, at_step: int,
                          **extra) -> None:
    """SIGKILL one training process once step ``at_step`` is logged (for two: the last rank; torchrun then
    stops the other)."""
    import psutil  # a development dependency: only the fault scenarios need it
    proc = start(command(args(data, run_dir, **(TWO_PROCESSES if nproc == 2 else {}), **extra), nproc=nproc))
    wait_for(lambda: logged_step(run_dir) >= at_step, f"step {at_step}")
    victims = psutil.Process(proc.pid).children() if nproc == 2 else [psutil.Process(proc.pid)]
    victims[-1].kill()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    latest = resolve_resume("latest", run_dir)
    assert latest is None or (latest / "trainer_state.json").is_file()
    resume_and_compare(data, reference, run_dir, nproc, **extra)


def kill9_inside_checkpoint_write(data: Path, reference: dict[int, Path], run_dir: Path, step: int) -> None:
    """SIGKILL while checkpoint ``step`` is half written: the previous one is chosen, then the run completes."""
    marker = run_dir.parent / f"{run_dir.name}.marker"
    proc = start(command(args(data, run_dir), fault=(marker, f"checkpoint:{step}")))
    wait_for(marker.exists, "the checkpoint write")
    proc.kill()
    proc.communicate(timeout=60)
    assert not (run_dir / f"checkpoints/step-{step}").exists(), "a half checkpoint looks complete"
    previous = run_dir / f"checkpoints/step-{step - CHECKPOINT_EVERY}" if step > CHECKPOINT_EVERY else None
    assert resolve_resume("latest", run_dir) == previous, "latest must pick the previous complete checkpoint"
    resume_and_compare(data, reference, run_dir)
    assert not (run_dir / f"checkpoints/step-{step}.tmp").exists(), "the half checkpoint was left behind"


def disk_full_while_checkpointing(data: Path, reference: dict[int, Path], run_dir: Path, from_step: int,
                                  file_limit: int) -> None:
    """Resume from ``from_step`` with every file limited to ``file_limit`` bytes (RLIMIT_FSIZE): the next
    checkpoint cannot be written; one line, the previous checkpoint intact, and once space is back the run
    completes."""
    copy_checkpoint(reference[1], from_step, run_dir)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    proc = launch.run(args(data, run_dir, **{"train.resume": "latest"}), preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"cannot write checkpoint {run_dir}" in line and "previous checkpoint is intact" in line, line
    assert resolve_resume("latest", run_dir) == run_dir / f"checkpoints/step-{from_step}"
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a half checkpoint was left behind"
    resume_and_compare(data, reference, run_dir)


def sigterm_during_evaluation(data: Path, reference: dict[int, Path], run_dir: Path, eval_every: int) -> None:
    """SIGTERM while the periodic evaluation after step ``eval_every`` runs: exit 130 with a checkpoint."""
    marker = run_dir.parent / f"{run_dir.name}.marker"
    evaluated = {"train.eval_every": eval_every, "eval.retrieval": f"[{data / 'retrieval'}]"}
    proc = start(command(args(data, run_dir, **evaluated), fault=(marker, "eval")))
    wait_for(marker.exists, "the evaluation")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert resolve_resume("latest", run_dir) == run_dir / f"checkpoints/step-{eval_every}", out[-2000:]
    resume_and_compare(data, reference, run_dir, **evaluated)


def sigterm_in_first_step_after_resume(data: Path, reference: dict[int, Path], run_dir: Path, from_step: int) -> None:
    """SIGTERM during the first step after resuming from ``from_step``: that step completes, is saved, exit 130."""
    marker = run_dir.parent / f"{run_dir.name}.marker"
    copy_checkpoint(reference[1], from_step, run_dir)
    proc = start(command(args(data, run_dir, **{"train.resume": "latest"}), fault=(marker, "first-step")))
    wait_for(marker.exists, "the first step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert resolve_resume("latest", run_dir) == run_dir / f"checkpoints/step-{from_step + 1}"
    resume_and_compare(data, reference, run_dir)


def two_runs_on_one_directory(data: Path, reference: dict[int, Path], run_dir: Path, at_step: int) -> None:
    """A second run on a live run's directory is refused; once the first is killed, the lock is gone."""
    marker = run_dir.parent / f"{run_dir.name}.marker"
    first = start(command(args(data, run_dir), fault=(marker, f"step:{at_step}")))
    wait_for(marker.exists, f"the first run's step {at_step}")
    second = launch.run(args(data, run_dir, **{"train.resume": "latest"}), timeout=300)
    assert second.returncode == 2 and f"train.output_dir {run_dir} is in use" in one_error_line(second.stderr)
    first.kill()
    first.communicate(timeout=60)
    resume_and_compare(data, reference, run_dir)


def peer_dies(data: Path, run_dir: Path, at_step: int, timeout_s: int = 20) -> float:
    """Two processes started by hand (no launcher to tear the group down); rank 1 is killed after step
    ``at_step``. Rank 0 must stop on its own, with one line, within the collective timeout. Returns the
    seconds it took."""
    port = launch.free_port()
    cli_args = args(data, run_dir, **TWO_PROCESSES, **{"train.max_steps": 60, "train.checkpoint_every": 0,
                                                        "train.collective_timeout_s": timeout_s})
    ranks = [start(launch.command(cli_args),
                   env=launch.environment(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in range(2)]
    wait_for(lambda: logged_step(run_dir) >= at_step, f"step {at_step}")
    killed_at = time.time()
    ranks[1].kill()
    _, err = ranks[0].communicate(timeout=timeout_s + 120)
    took = time.time() - killed_at
    assert ranks[0].returncode == 2, err[-3000:]
    assert "another process died or stopped answering" in one_error_line(err)
    assert took < timeout_s + 30, f"the survivor took {took:.0f} s"
    return took


def rewrite_members(shard: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite every member of a tar through ``change(name, bytes) -> bytes``."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            payload = change(member.name, payload)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


DAMAGES = {
    "truncated tar": lambda shard: shard.write_bytes(shard.read_bytes()[:3000]),
    "undecodable image": lambda shard: rewrite_members(
        shard, lambda name, b: b"not an image" if name.endswith((".jpg", ".png", ".webp")) else b),
    "index outside the state": lambda shard: rewrite_members(
        shard, lambda name, b: json.dumps({**json.loads(b), "image_index": 10**6}).encode()
        if name.endswith(".json") else b),
}


def damaged_copy(data: Path, to: Path, damage: str, shards: Optional[int] = None) -> Path:
    """A copy of the train set with its first ``shards`` shards (all: None) damaged one way."""
    shutil.copytree(data / "train", to)
    for shard in sorted(to.glob("*.tar"))[:shards]:
        DAMAGES[damage](shard)
    return to


def damaged_shard(data: Path, run_dir: Path, damage: str) -> str:
    """Every train shard damaged one way: the run stops at the first one it meets with one line naming the
    shard and the sample key, before any checkpoint. Returns that line."""
    bad = damaged_copy(data, run_dir.parent / f"{run_dir.name}-data", damage)
    proc = launch.run(args(data, run_dir, **{"data.train": bad}), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"shard {bad}/" in line, line
    if damage != "truncated tar":  # a cut tar is named with the last sample read before the cut
        assert "sample key" in line, line
    assert resolve_resume("latest", run_dir) is None
    return line


def damaged_shard_skipped(data: Path, run_dir: Path, damage: str, at_step: int) -> int:
    """One shard damaged one way, data.on_bad_sample=skip: the steps whose batch meets it are skipped and
    counted, the others train; killed after ``at_step`` and resumed, the run equals its uninterrupted self
    (the skips are a function of the data). Returns the number of skipped steps."""
    bad = damaged_copy(data, run_dir.parent / f"{run_dir.name}-data", damage, shards=1)
    skip = {"data.train": bad, "data.on_bad_sample": "skip"}
    uninterrupted = run_dir.parent / f"{run_dir.name}-uninterrupted"
    finish(args(data, uninterrupted, **skip))
    lines = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if "skipped_samples" in x]
    assert 0 < len(skipped) < STEPS, f"{len(skipped)} of {STEPS} steps skipped"
    assert all(f"shard {bad}/" in e for x in skipped for e in x["skipped_examples"])
    kill9_during_training(data, {1: uninterrupted}, run_dir, 1, at_step, **skip)
    return len(skipped)
