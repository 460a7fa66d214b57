"""loss.name siglip: open_clip's SigLipLoss with its initialisation, the same at two processes as at one, and a
resumable training run on the user's path (design.md §4.5b)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from torch.testing import assert_close

import siglip_dist_worker
from clip_dro.bench import launch
from clip_dro.checkpoint import read_loss_state
from clip_dro.cli import main
from clip_dro.losses import SigLIPLoss, build_loss
from losses_dist_worker import STEPS, run_steps
from test_trainer import TINY, assert_same_checkpoint, overrides


def _features(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    return image, text


def test_initialised_as_siglip_and_equal_to_open_clip_and_to_the_formula():
    loss = build_loss("siglip", 20, 20)
    assert isinstance(loss, SigLIPLoss)
    assert loss.logit_scale.item() == pytest.approx(math.log(10)) and loss.logit_bias.item() == -10.0
    image, text = _features(12, 8, seed=0)
    ids = torch.arange(12)
    ours_image, ours_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    value = loss(ours_image, ours_text, ids, ids)
    value.backward()

    # open_clip's module, called directly, with its own copies of scale and bias: the float32 parameters' values,
    # in the features' float64 as ours computes them
    scale = torch.tensor(math.log(10), dtype=torch.float32).double().requires_grad_()
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ref_image, ref_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    reference = SigLipLoss()(ref_image, ref_text, scale.exp(), bias)
    reference.backward()
    assert_close(value, reference, rtol=1e-12, atol=0)
    assert_close(ours_image.grad, ref_image.grad, rtol=1e-12, atol=1e-15)
    assert_close(ours_text.grad, ref_text.grad, rtol=1e-12, atol=1e-15)
    assert_close(loss.logit_scale.grad, scale.grad.float(), rtol=0, atol=0)  # rounded once to float32
    assert_close(loss.logit_bias.grad, bias.grad.float(), rtol=0, atol=0)

    # the paper's formula: -(1/B) Σ_ij log σ(z_ij (t·x_i·y_j + b)), z = +1 on the diagonal and -1 elsewhere
    labels = 2 * torch.eye(12, dtype=torch.float64) - 1
    logits = 10.0 * image @ text.T - 10.0
    formula = -F.logsigmoid(labels * logits).sum() / 12
    assert_close(value.detach(), formula, rtol=1e-6, atol=0)  # scale and bias are float32 parameters
    stats = loss.stats()
    assert stats["loss"] == pytest.approx(float(formula), rel=1e-6)
    assert stats["logit_scale"] == pytest.approx(10.0) and stats["logit_bias"] == -10.0
    assert float(loss.tau_img[0]) == pytest.approx(0.1) and loss.tau_txt.shape == (20,)


def test_float32_features_give_open_clip_value_and_gradients_exactly():
    """The trainer's case: float32 features, float32 scale and bias, nothing converted."""
    image, text = (f.float() for f in _features(16, 8, seed=1))
    loss, ids = build_loss("siglip", 16, 16), torch.arange(16)
    ours = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    loss(*ours, ids, ids).backward()
    scale, bias = torch.tensor(math.log(10), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    theirs = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    SigLipLoss()(*theirs, scale.exp(), bias).backward()
    for got, want in zip(ours + [loss.logit_scale, loss.logit_bias], theirs + [scale, bias]):
        assert torch.equal(got.grad, want.grad)


def test_scale_clamped_bias_free_and_both_in_the_state_dict():
    loss = build_loss("siglip", 4, 4)
    with torch.no_grad():
        loss.logit_scale.fill_(7.0)
        loss.logit_bias.fill_(3.5)
    loss.after_optimizer_step()
    assert loss.logit_scale.item() == pytest.approx(math.log(100)) and loss.logit_bias.item() == 3.5
    restored = build_loss("siglip", 4, 4)
    restored.load_state_shards([loss.state_dict()])
    assert torch.equal(restored.logit_scale, loss.logit_scale) and torch.equal(restored.logit_bias, loss.logit_bias)
    assert {name for name, _ in loss.named_parameters()} == {"logit_scale", "logit_bias"}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_match_one_process_with_the_whole_batch(tmp_path, processes):
    """50 SGD steps of a DDP-wrapped float64 projection through open_clip's neighbour exchange over gloo (2
    processes: its one-way exchange; 4: its bidirectional one as well): the loss value, the towers' gradients
    (after DDP's mean) and the scale's and bias's gradients (averaged by the loss) equal one process's on the
    same global batch."""
    done = launch.run([str(tmp_path)], nproc=processes, entry=[str(Path(siglip_dist_worker.__file__))],
                      timeout=300, env=launch.environment(PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(processes)]
    single = run_steps("siglip", rank=0, world_size=1)
    assert len(single) == STEPS and all(len(r) == STEPS for r in records)
    for step, want in enumerate(single):
        for rank, got in enumerate(r[step] for r in records):
            where = f"rank {rank} of {processes}, step {step}"
            assert_close(got["value"], want["value"], rtol=1e-10, atol=1e-12, msg=where)
            assert got["grads"].keys() == want["grads"].keys() >= {"loss.logit_scale", "loss.logit_bias"}
            for key in want["grads"]:
                assert_close(got["grads"][key], want["grads"][key], rtol=1e-9, atol=1e-12, msg=f"{where} {key}")
            for key in ("logit_scale", "logit_bias"):
                assert torch.equal(got["state"][key], want["state"][key]), f"{where} {key}"
    assert float(single[-1]["state"]["logit_bias"]) != -10.0, "the bias did not learn"


@pytest.mark.slow
def test_siglip_run_resumes_exactly_at_two_processes_from_the_cli(data, tmp_path):
    """`clip-dro train loss.name=siglip` with a loader worker at two processes: resumed from its step-3
    checkpoint it ends where the uninterrupted run ends, the scale and bias included."""
    def train(out: Path, **extra) -> None:
        args = ["train", "--config", str(TINY)] + overrides(data, out, **{
            "loss.name": "siglip", "data.batch_size": 8, "data.workers": 1, **extra})
        done = launch.run(args, nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]

    train(tmp_path / "full")
    train(tmp_path / "resumed", **{"train.resume": str(tmp_path / "full/checkpoints/step-3")})
    assert_same_checkpoint(tmp_path / "full/final", tmp_path / "resumed/final")
    midway, final = read_loss_state(tmp_path / "full/checkpoints/step-3"), read_loss_state(tmp_path / "full/final")
    assert float(midway["logit_bias"]) != -10.0 and float(final["logit_bias"]) != float(midway["logit_bias"])
    # model.pt carries the learned scale for open_clip (tiny-vit has no logit_bias of its own)
    model = torch.load(tmp_path / "full/final/model.pt")
    assert float(model["logit_scale"]) == float(final["logit_scale"])


def test_quickstart_refuses_an_unknown_loss_in_one_line(tmp_path, capsys):
    code = main(["quickstart", "--output", str(tmp_path / "q"), "--losses", "clip,siglip,sigmoid"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "clip-dro quickstart: error: --losses: 'sigmoid' is not one of clip, sogclr, isogclr, rgclg, siglip")
    assert not (tmp_path / "q/data").exists(), "work started before the check"


@pytest.mark.slow
def test_quickstart_compares_siglip_from_the_cli(tmp_path):
    code = main(["quickstart", "--output", str(tmp_path), "--steps", "2", "--num-train", "480", "--setup", "scratch",
                 "--losses", "clip,siglip"])
    assert code == 0
    runs = {r["loss"]: r["metrics"] for r in json.loads((tmp_path / "comparison.json").read_text())["runs"]}
    assert list(runs) == ["clip", "siglip"] and all(0 <= m["retrieval/r_mean"] <= 100 for m in runs.values())
    # SigLIP's one learned temperature, read from its model.pt: it moved from 1/10 in two steps
    assert runs["siglip"]["tau_img_mean"] == runs["siglip"]["tau_txt_mean"] != pytest.approx(0.1, abs=1e-9)
    assert "| siglip |" in (tmp_path / "comparison.md").read_text()
