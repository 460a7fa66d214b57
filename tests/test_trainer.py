"""The trainer: exact resume, one process equals two, failures leave resumable state, clear errors."""
import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from clip_dro.bench import launch
from clip_dro.checkpoint import CheckpointError, read_loss_state
from clip_dro.config import load_config
from clip_dro.models import build_model
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import NonFiniteLoss, train

TINY = CONFIGS_DIR / "tiny_cpu.yaml"


def overrides(data_dir: Path, out: Path, **extra) -> list[str]:
    base = {"data.train": str(data_dir / "train"), "data.batch_size": 16, "data.workers": 0, "data.lanes": 2,
            "train.max_steps": 6, "train.warmup_steps": 2, "train.checkpoint_every": 3, "train.log_every": 1,
            "train.output_dir": str(out), "eval.retrieval": "[]", "eval.zeroshot": "[]",
            "loss.tau_warmup_steps": 0, "loss.tau_min": 0.01, "loss.tau_init": 0.05}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(data_dir, out, **extra) -> Path:
    return train(load_config(TINY, overrides(data_dir, out, **extra)))


def assert_same_checkpoint(a: Path, b: Path, weights_atol: float = 0.0, state_atol: float = 0.0) -> None:
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], atol=weights_atol, rtol=0, msg=k)
    la, lb = read_loss_state(a), read_loss_state(b)
    assert la.keys() == lb.keys()
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=state_atol, rtol=0, msg=k)


@pytest.mark.slow
def test_resume_from_midway_checkpoint_equals_uninterrupted(data, tmp_path):
    full = run(data, tmp_path / "full")
    assert (tmp_path / "full/checkpoints/step-3/trainer_state.json").is_file()
    resumed = run(data, tmp_path / "resumed", **{"train.resume": str(tmp_path / "full/checkpoints/step-3")})
    assert_same_checkpoint(full, resumed)
    ta, tb = pd.read_csv(full / "temperatures.csv"), pd.read_csv(resumed / "temperatures.csv")
    pd.testing.assert_frame_equal(ta, tb)
    manifest = json.loads((data / "train/manifest.json").read_text())
    assert list(ta.columns) == ["side", "index", "tau"]
    assert (ta.side == "image").sum() == manifest["num_images"] and (ta.side == "text").sum() == manifest["num_texts"]
    assert ta.tau.nunique() > 1, "iSogCLR moved no temperature"


@pytest.mark.slow
def test_run_directory_layout_and_open_clip_loads_final_model(data, tmp_path):
    import open_clip

    final = run(data, tmp_path / "run", **{"train.max_steps": 3})
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").is_file() and final == run_dir / "final"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all({"loss", "lr", "samples_per_s", "tau_img_mean", "tau_txt_mean", "objective"} <= m.keys() for m in lines)
    model, _, _ = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(final / "model.pt"))
    saved = torch.load(final / "model.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    reference = build_model("tiny-vit").model.state_dict()
    assert not torch.equal(reference["visual.proj"], saved["visual.proj"]), "training changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["isogclr", "clip"])
def test_two_processes_equal_one_process_with_double_batch(data, tmp_path, loss):
    common = ["train", "--config", str(TINY)]
    one = launch.run(common + overrides(data, tmp_path / "one", **{"data.batch_size": 16, "train.max_steps": 4,
                                                                    "loss.name": loss}))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch.run(common + overrides(data, tmp_path / "two", **{"data.batch_size": 8, "train.max_steps": 4,
                                                                    "loss.name": loss}), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # Summation order differs (DDP's all-reduce), and AdamW turns gradients that are zero up to rounding (the
    # attention key biases) into steps of either sign, so weights agree to ~lr/10; the state is tighter.
    assert_same_checkpoint(tmp_path / "one/final", tmp_path / "two/final", weights_atol=1e-4, state_atol=2e-5)


@pytest.mark.slow
def test_interrupted_run_leaves_checkpoint_and_resumes_to_same_result(data, tmp_path):
    args = ["train", "--config", str(TINY)] + overrides(data, tmp_path / "killed", **{
        "train.max_steps": 30, "train.checkpoint_every": 0, "loss.name": "sogclr"})
    proc = subprocess.Popen(launch.command(args), env=launch.environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step_dirs = list((tmp_path / "killed/checkpoints").glob("step-*"))
    assert len(step_dirs) == 1 and "resume with train.resume=latest" in out
    stopped_at = int(step_dirs[0].name.split("-")[1])
    assert 3 <= stopped_at < 30
    resumed = launch.run(args + ["train.resume=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {step_dirs[0]} at step {stopped_at}" in resumed.stdout + resumed.stderr
    # The same thread count as the killed run (OMP_NUM_THREADS=1), so that float summation order matches.
    full = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / "full", **{
        "train.max_steps": 30, "train.checkpoint_every": 0, "loss.name": "sogclr"}))
    assert full.returncode == 0, full.stderr[-3000:]
    assert_same_checkpoint(tmp_path / "full/final", tmp_path / "killed/final")


@pytest.mark.slow
def test_checkpoint_from_another_dataset_is_refused(data, tmp_path):
    from data_prep.synthetic import prep_synthetic

    run(data, tmp_path / "a", **{"train.max_steps": 3})
    other = tmp_path / "other"
    prep_synthetic(output=other, num_train=400, seed=1, workers=1)
    with pytest.raises(CheckpointError, match="trained on another dataset"):
        run(other, tmp_path / "b", **{"train.resume": str(tmp_path / "a/checkpoints/step-3")})
    with pytest.raises(CheckpointError, match="loss.name 'clip'"):
        run(data, tmp_path / "c", **{"train.resume": str(tmp_path / "a/checkpoints/step-3"), "loss.name": "clip"})


@pytest.mark.slow
def test_bad_config_fails_before_work_with_one_line(data, tmp_path):
    proc = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / "x", **{"loss.rhoo": 1}))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("clip-dro train: error: unknown config key loss.rhoo")
    assert not (tmp_path / "x/metrics.jsonl").exists()
    proc = launch.run(["train", "--config", str(TINY)] + overrides(tmp_path / "nowhere", tmp_path / "y"))
    assert proc.returncode == 2 and "is not a prep output directory" in proc.stderr
    proc = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / "z", **{
        "eval.retrieval": f"[{data / 'zeroshot'}, {tmp_path / 'missing'}]"}))
    assert proc.returncode == 2 and "missing" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "z/metrics.jsonl").exists(), "a bad eval set must fail before training"


@pytest.mark.slow
def test_nonfinite_features_stop_or_skip_without_touching_state(data, tmp_path):
    bundle = build_model("tiny-vit")
    state = bundle.model.state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteLoss, match=r"non-finite features at step 1 \(image_index"):
        run(data, tmp_path / "stop", **{"model.pretrained": str(tmp_path / "nan.pt")})
    assert not (tmp_path / "stop/final").exists()
    final = run(data, tmp_path / "skip", **{"model.pretrained": str(tmp_path / "nan.pt"),
                                             "train.on_nonfinite": "skip"})
    taus = pd.read_csv(final / "temperatures.csv").tau
    assert ((taus - 0.05).abs() < 1e-7).all(), "a skipped batch changed the per-sample state"


def test_resume_latest_picks_final_then_highest_complete_step(tmp_path):
    from clip_dro.checkpoint import TRAINER_STATE, resolve_resume

    assert resolve_resume("latest", tmp_path) is None and resolve_resume(None, tmp_path) is None
    for name in ("checkpoints/step-9", "checkpoints/step-10", "checkpoints/step-11.tmp"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoints/step-9" / TRAINER_STATE).write_text("{}")
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoints/step-9"  # step-10 is incomplete
    (tmp_path / "checkpoints/step-10" / TRAINER_STATE).write_text("{}")
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoints/step-10"
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / TRAINER_STATE).write_text("{}")
    assert resolve_resume("latest", tmp_path) == tmp_path / "final"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints/step-11.tmp"), tmp_path)
