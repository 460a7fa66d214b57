"""Gradient caching (train.accum_steps): k micro-batches give the unsplit batch's step, at 1 and 2 processes."""
import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from clip_dro.bench import launch
from clip_dro.bench.accum_memory import bench_accum_memory
from clip_dro.checkpoint import CheckpointError, check_same_settings, read_loss_state
from clip_dro.config import ConfigError, load_config
from clip_dro.grad_cache import TowerForward
from clip_dro.models import build_model
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import train

TINY = CONFIGS_DIR / "tiny_cpu.yaml"


def overrides(data_dir: Path, out: Path, **extra) -> list[str]:
    base = {"data.train": str(data_dir / "train"), "data.batch_size": 16, "data.workers": 1, "data.lanes": 2,
            "train.max_steps": 3, "train.warmup_steps": 1, "train.log_every": 1, "train.output_dir": str(out),
            "eval.retrieval": "[]", "eval.zeroshot": "[]", "loss.tau_warmup_steps": 0, "loss.tau_min": 0.01,
            "loss.tau_init": 0.05}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def differences(a: Path, b: Path) -> dict[str, float]:
    """Max abs difference of the weights and of every per-sample state buffer (τ, s, ...) of two checkpoints."""
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    la, lb = read_loss_state(a), read_loss_state(b)
    assert ma.keys() == mb.keys() and la.keys() == lb.keys()
    gaps = {k: float((ma[k].double() - mb[k].double()).abs().max()) for k in ma}
    worst = max(gaps, key=gaps.get)
    out = {"weights": gaps[worst], "weights_at": worst}
    for k in la:
        if la[k].is_floating_point():
            out[k] = float((la[k].double() - lb[k].double()).abs().max())
        else:
            assert torch.equal(la[k], lb[k]), k
    return out


# The sums are reordered (each micro-batch's weight gradients are added to the previous ones'), and AdamW turns
# gradients that are zero up to rounding (attention key biases) into steps of either sign, so weights agree
# to ~lr/10 (as 2 processes against 1 in test_trainer); the per-sample state is tighter.
WEIGHTS_ATOL, STATE_ATOL = 1e-4, 1e-5


def assert_equal_runs(reference: Path, other: Path, label: str) -> None:
    found = differences(reference, other)
    print(label, json.dumps(found))
    assert found["weights"] <= WEIGHTS_ATOL, (label, found)
    assert all(v <= STATE_ATOL for k, v in found.items() if not k.startswith("weights")), (label, found)


def test_accum_steps_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"train.accum_steps: 3 must divide data.batch_size \(16\)"):
        load_config(TINY, ["data.batch_size=16", "train.accum_steps=3"])
    with pytest.raises(ConfigError, match="train.accum_steps: 0 must be >= 1"):
        load_config(TINY, ["train.accum_steps=0"])


def test_a_run_may_resume_with_another_number_of_micro_batches():
    def settings(*keys: str) -> dict:
        return load_config(TINY, ["data.batch_size=16", *keys]).to_dict()

    check_same_settings(Path("ckpt"), settings(), settings("train.accum_steps=4"))
    with pytest.raises(CheckpointError, match="train.max_steps = None, this run has 9"):
        check_same_settings(Path("ckpt"), settings(), settings("train.max_steps=9"))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["isogclr", "clip", "sogclr"])
def test_micro_batches_give_the_unsplit_step(data, tmp_path, loss):
    runs = {k: train(load_config(TINY, overrides(data, tmp_path / f"k{k}", **{"loss.name": loss,
                                                                              "train.accum_steps": k})))
            for k in (1, 2, 4)}
    for k in (2, 4):
        assert_equal_runs(runs[1], runs[k], f"{loss} W=1 k={k}")
    trained = torch.load(runs[1] / "model.pt")["visual.proj"]
    assert not torch.equal(build_model("tiny-vit").model.state_dict()["visual.proj"], trained), "nothing trained"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["isogclr", "clip", "sogclr"])
def test_micro_batches_give_the_unsplit_step_at_two_processes(data, tmp_path, loss):
    ks = (1, 2, 4)
    for k in ks:
        proc = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / f"k{k}", **{
            "data.batch_size": 8, "loss.name": loss, "train.accum_steps": k}), nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for k in ks[1:]:
        assert_equal_runs(tmp_path / "k1/final", tmp_path / f"k{k}/final", f"{loss} W=2 k={k}")


@pytest.mark.slow
def test_frozen_batchnorm_is_equal_and_train_mode_batchnorm_is_announced(data, tmp_path, caplog):
    frozen = {"model.name": "tiny-rn", "model.image_batchnorm": "frozen", "train.max_steps": 2}
    with caplog.at_level(logging.WARNING, logger="clip_dro.train"):
        one = train(load_config(TINY, overrides(data, tmp_path / "k1", **frozen)))
        four = train(load_config(TINY, overrides(data, tmp_path / "k4", **frozen, **{"train.accum_steps": 4})))
    assert not [r for r in caplog.records if r.name == "clip_dro.train"]
    assert_equal_runs(one, four, "tiny-rn frozen BatchNorm W=1 k=4")
    with caplog.at_level(logging.WARNING, logger="clip_dro.train"):
        train(load_config(TINY, overrides(data, tmp_path / "bn", **{**frozen, "model.image_batchnorm": "train",
                                                                     "train.max_steps": 1, "train.accum_steps": 2})))
    notes = [r.getMessage() for r in caplog.records if "BatchNorm" in r.getMessage()]
    assert len(notes) == 1 and "micro-batch with its own statistics" in notes[0]


class _Dropout(torch.nn.Module):
    """Two towers with dropout (and BatchNorm on the image side) that remember every output they produce."""

    def __init__(self):
        super().__init__()
        self.image, self.text, self.drop = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3), torch.nn.Dropout(0.5)
        self.batchnorm = torch.nn.BatchNorm1d(3)
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, images, tokens):
        image, text = self.batchnorm(self.drop(self.image(images))), self.drop(self.text(tokens))
        self.outputs.append((image.detach().clone(), text.detach().clone()))
        return image, text, None


def test_reforward_sees_the_first_forward_random_state_and_batchnorm_counts_each_micro_batch_once():
    torch.manual_seed(0)
    model = _Dropout().train()
    towers = TowerForward(Accelerator(cpu=True), model, micro_batches=2)
    tokens = torch.randn(6, 5)
    image, text = towers.features(torch.randn(6, 4), tokens)
    (image.sum() + 2 * text.sum()).backward()
    running = model.batchnorm.running_mean.clone()
    towers.backward_towers(image, text)
    first, again = model.outputs[:2], model.outputs[2:]
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert int(model.batchnorm.num_batches_tracked) == 2 and torch.equal(model.batchnorm.running_mean, running)
    # d/dW of 2·sum(text) through dropout's mask M of the first forward: 2 · (M / (1 − p))^T @ tokens.
    mask = torch.cat([t for _, t in first]) != 0
    torch.testing.assert_close(model.text.weight.grad, 2 * (mask.float() * 2).T @ tokens)


@pytest.mark.slow
def test_bench_reports_peak_memory_falling_with_micro_batches():
    result = bench_accum_memory("tiny-vit", batch_size=64, accum_steps=4)
    assert result["case"] == "accum_memory" and result["baseline_bytes"] > result["bytes_per_process"] > 0
    assert result["ratio"] < 0.6, result
