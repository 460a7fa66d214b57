"""Warm start (train.init_from): a new run from a checkpoint's weights and per-sample state, refusals in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from clip_dro.bench import launch
from clip_dro.checkpoint import CheckpointError, TrainerState, read_loss_state
from clip_dro.config import ConfigError, load_config
from clip_dro.manifest import load_manifest
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import Trainer, _accelerator, train

TINY = CONFIGS_DIR / "tiny_cpu.yaml"


def overrides(data_dir: Path, out: Path, **extra) -> list[str]:
    base = {"data.train": str(data_dir / "train"), "data.batch_size": 16, "data.workers": 1, "data.lanes": 2,
            "train.max_steps": 4, "train.warmup_steps": 1, "train.log_every": 1, "train.output_dir": str(out),
            "eval.retrieval": "[]", "eval.zeroshot": "[]", "loss.tau_warmup_steps": 0, "loss.tau_min": 0.01,
            "loss.tau_init": 0.05, "loss.tau_lr": 0.3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


PER_SAMPLE = ("img.tau", "txt.tau", "img.log_s", "txt.log_s", "img.m", "txt.m", "img.visited", "txt.visited")


@pytest.fixture(scope="module")
def pretrained(data, module_tmp) -> Path:
    """A finished 1-process iSogCLR run whose temperatures moved."""
    final = train(load_config(TINY, overrides(data, module_tmp("warm") / "a")))
    assert read_loss_state(final)["img.tau"].unique().numel() > 1
    return final


@pytest.mark.slow
def test_warm_start_loads_weights_every_temperature_and_optionally_the_optimizer(data, pretrained, tmp_path):
    for run in ("b", "c"):
        (tmp_path / run).mkdir()  # as train() does before building the Trainer
    cfg = load_config(TINY, overrides(data, tmp_path / "b", **{"train.init_from": str(pretrained),
                                                                "train.init_optimizer": "true", "train.lr": 2e-4,
                                                                "train.max_steps": 10}))
    trainer = Trainer(cfg, _accelerator("fp32", tmp_path / "b", 60, ["jsonl"]))
    saved, state = read_loss_state(pretrained), trainer.loss_fn.state_dict()
    for key in PER_SAMPLE:
        assert torch.equal(state[key], saved[key]), key
    assert int(state["step"]) == 0 and trainer.global_step == 0 and trainer.total_steps == 10  # a new schedule
    weights = torch.load(pretrained / "model.pt")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    moments = torch.load(pretrained / "optimizer.bin", weights_only=True)["state"]
    loaded = trainer.optimizer.state_dict()
    assert loaded["state"].keys() == moments.keys()
    assert all(torch.equal(loaded["state"][i]["exp_avg"], moments[i]["exp_avg"]) for i in moments)
    # This run's learning rate and schedule, not the checkpoint's (lr 1e-3 at the end of its cosine).
    assert [g["lr"] for g in loaded["param_groups"]] == trainer.scheduler.get_last_lr()
    assert all(g["initial_lr"] == 2e-4 for g in loaded["param_groups"])
    without = Trainer(load_config(TINY, overrides(data, tmp_path / "c", **{"train.init_from": str(pretrained)})),
                      _accelerator("fp32", tmp_path / "c", 60, ["jsonl"]))
    assert without.optimizer.state_dict()["state"] == {}


@pytest.mark.slow
def test_two_processes_start_from_a_one_process_checkpoint_with_its_temperatures(data, pretrained, tmp_path):
    # τ's learning rate 0: the first step keeps every τ (s and m move), so the final τ are the checkpoint's.
    args = ["train", "--config", str(TINY)] + overrides(data, tmp_path / "two", **{
        "data.batch_size": 8, "train.init_from": str(pretrained), "train.max_steps": 1, "loss.tau_lr": 0.0})
    proc = launch.run(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"started from {pretrained}" in proc.stdout
    before, after = read_loss_state(pretrained), read_loss_state(tmp_path / "two/final")
    for side in ("img", "txt"):
        assert torch.equal(after[f"{side}.tau"], before[f"{side}.tau"]), side
        moved = (after[f"{side}.log_s"] != before[f"{side}.log_s"]).sum()
        assert 0 < moved <= 16, (side, moved)  # the first global batch's samples, the others untouched
    assert TrainerState.read(tmp_path / "two/final").global_step == 1
    assert json.loads((tmp_path / "two/metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.slow
def test_changed_max_steps_on_resume_points_to_init_from(data, pretrained, tmp_path):
    with pytest.raises(CheckpointError, match=r"train.max_steps = 4, this run has 9: .*train.init_from="):
        train(load_config(TINY, overrides(data, pretrained.parent, **{"train.resume": "latest",
                                                                       "train.max_steps": 9})))


@pytest.mark.slow
def test_requeued_warm_start_resumes_its_own_checkpoint(data, pretrained, tmp_path, capsys):
    """What launch/slurm.sbatch runs: train.resume=latest with train.init_from. The first start warm-starts; the
    same command again (a requeued job) resumes the run's own latest checkpoint instead of starting over."""
    cfg = load_config(TINY, overrides(data, tmp_path / "run", **{
        "train.init_from": str(pretrained), "train.resume": "latest", "train.checkpoint_every": 2}))
    first = train(cfg)
    assert f"started from {pretrained}" in capsys.readouterr().out
    reference = {"model": torch.load(first / "model.pt"), "loss": read_loss_state(first)}
    for later in [first, *(tmp_path / "run/checkpoints").glob("step-*")]:  # as if killed after step 2's
        if later.name != "step-2":
            shutil.rmtree(later)
    again = train(cfg)
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'run/checkpoints/step-2'} at step 2" in out and "started from" not in out
    for part, saved in (("model", torch.load(again / "model.pt")), ("loss", read_loss_state(again))):
        assert saved.keys() == reference[part].keys()
        assert all(torch.equal(saved[k], reference[part][k]) for k in saved), part


def fake_checkpoint(directory: Path, manifest, **changes) -> Path:
    """A directory with only a trainer_state.json: enough for the checks that refuse it."""
    directory.mkdir(parents=True)
    fields = dict(global_step=4, epoch=0, step_in_epoch=4, dataset_id=manifest.dataset_id,
                  num_images=manifest.num_images, num_texts=manifest.num_texts, model_name="tiny-vit",
                  loss_name="isogclr", scheduler={}, global_batch=16, lanes=2)
    TrainerState(**{**fields, **changes}).write(directory)
    return directory


def test_init_from_refusals_are_one_line(data, tmp_path):
    manifest = load_manifest(data / "train")
    with pytest.raises(ConfigError, match=r"train.init_from: 'x' starts a new run and cannot be combined with "
                                          r"train.resume=runs/a/final \(a checkpoint to continue\)"):
        load_config(TINY, ["train.init_from=x", "train.resume=runs/a/final"])
    with pytest.raises(ConfigError, match="train.init_optimizer: True needs train.init_from"):
        load_config(TINY, ["train.init_optimizer=true"])
    other = fake_checkpoint(tmp_path / "other", manifest, dataset_id="0123abcd", num_images=99)
    refusals = {
        str(other): rf"train.init_from: checkpoint {other} was trained on another dataset \(id 0123abcd, 99 images, "
                    rf"{manifest.num_texts} texts\) than data.train \(id {manifest.dataset_id}, "
                    rf"{manifest.num_images} images",
        str(fake_checkpoint(tmp_path / "clip", manifest, loss_name="clip")): "train.init_from: .*loss.name 'isogclr'",
        str(tmp_path / "nothing"): r"train.init_from: .*nothing is not a complete checkpoint directory",
        str(fake_checkpoint(tmp_path / "run/final", manifest)): r"train.init_from: .*run/final lies in "
                                                                 r"train.output_dir .*run, which the new run would",
    }
    for init_from, message in refusals.items():
        with pytest.raises(CheckpointError, match=message) as caught:
            train(load_config(TINY, overrides(data, tmp_path / "run", **{"train.init_from": init_from})))
        assert "\n" not in str(caught.value)
