"""What a user sees when training meets bad input (one line, with loader workers on), and which settings a
resumed run may change."""
import json
import shutil

import pytest
import torch

from clip_dro.bench import launch
from clip_dro.checkpoint import CheckpointError
from clip_dro.data.train_loader import LoaderError
from clip_dro.models import build_model
from test_trainer import TINY, assert_same_checkpoint, overrides, run

SHARD = "loss_state/shard-00000-of-00001.pt"


@pytest.fixture(scope="module")
def full_run(data, module_tmp):
    """Six steps with a loader worker, a checkpoint every three."""
    out = module_tmp("runs") / "full"
    run(data, out, **{"data.workers": 1})
    return out


def assert_one_line_error(proc, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "clip-dro train: error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("clip-dro train: error: "), "the message must start its own line"
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("change, key", [
    ({"data.batch_size": 8}, "global batch"),
    ({"data.lanes": 4}, "data.lanes = 2, this run has 4"),
    ({"train.seed": 1}, "train.seed = 0, this run has 1"),
    ({"train.lr": "1e-4"}, "train.lr = 0.001, this run has 0.0001"),
    ({"train.max_steps": 9}, "train.max_steps = 6, this run has 9"),
    ({"loss.rho": 2}, "loss.rho"),
])
def test_resume_refuses_settings_that_change_the_run(data, full_run, tmp_path, change, key):
    with pytest.raises(CheckpointError, match=key):
        run(data, tmp_path / "r", **{"data.workers": 1, "train.resume": str(full_run / "checkpoints/step-3"),
                                     **change})
    assert not (tmp_path / "r/checkpoints").exists()


@pytest.mark.slow
def test_resume_allows_what_cannot_change_the_run(data, full_run, tmp_path):
    """Workers, logging, checkpoint cadence, the output directory and what to do with bad samples (on clean
    data) change nothing: same final state."""
    resumed = run(data, tmp_path / "r", **{"train.resume": str(full_run / "checkpoints/step-3"), "data.workers": 2,
                                           "train.log_every": 2, "train.checkpoint_every": 0,
                                           "data.on_bad_sample": "skip", "train.on_nonfinite": "skip"})
    assert_same_checkpoint(full_run / "final", resumed)


@pytest.mark.slow
def test_loader_worker_error_is_one_line(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data / "train", bad)
    for shard in bad.glob("*.tar"):  # cut short after their first samples: the first step meets one
        shard.write_bytes(shard.read_bytes()[:3000])
    proc = launch.run(["train", "--config", str(TINY)] + overrides(bad.parent, tmp_path / "x", **{
        "data.train": str(bad), "data.workers": 1}))
    assert_one_line_error(proc, f"shard {bad}/shard-")


@pytest.mark.slow
def test_nonfinite_loss_is_one_line(data, tmp_path):
    state = build_model("tiny-vit").model.state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    proc = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / "x", **{
        "data.workers": 1, "model.pretrained": str(tmp_path / "nan.pt")}))
    assert_one_line_error(proc, "non-finite features at step 1")


@pytest.mark.slow
@pytest.mark.parametrize("damage, fragment", [
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3,'), "trainer_state.json is damaged"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "lacks dataset_id"),
    (lambda c: (c / SHARD).write_bytes((c / SHARD).read_bytes()[:100]), "cannot be loaded"),
    (lambda c: (c / SHARD).unlink(), "does not hold one complete set"),
    (lambda c: (c / "config.yaml").write_text("train: [\n"), "config.yaml cannot be used"),
])
def test_damaged_checkpoint_is_one_line(data, full_run, tmp_path, damage, fragment):
    checkpoint = tmp_path / "step-3"
    shutil.copytree(full_run / "checkpoints/step-3", checkpoint)
    damage(checkpoint)
    proc = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / "x", **{
        "data.workers": 1, "train.resume": str(checkpoint)}))
    assert_one_line_error(proc, str(checkpoint), fragment)


@pytest.mark.parametrize("processes, batch, workers, lanes, message", [
    (8, 64, 6, 12, "data.lanes = 12 must be a multiple of the number of processes (8); data.lanes=8 would work"),
    (2, 5, 1, 4, "must divide the global batch, data.batch_size x processes = 5 x 2 = 10; data.lanes=2 would"),
    (1, 256, 6, 128, "data.lanes = 128 exceeds the 100 shards of d (every lane needs a shard); data.lanes=64"),
    (4, 64, 6, None, "data.lanes (default: processes x max(data.workers, 1)) = 24 must divide the global batch"),
])
def test_launch_layout_errors_name_the_keys_and_a_value_that_works(processes, batch, workers, lanes, message):
    from clip_dro.data.train_loader import check_layout

    with pytest.raises(LoaderError) as err:
        check_layout("d", 100, batch, processes, workers, lanes)
    assert message in str(err.value)
    fix = str(err.value).rsplit("data.lanes=", 1)[-1].split()[0]
    if fix.isdigit():
        assert check_layout("d", 100, batch, processes, workers, int(fix)) == int(fix)


def test_workers_need_not_divide_lanes():
    from clip_dro.data.train_loader import check_layout

    for processes in (1, 8, 32):
        assert check_layout("d", 100, 64, processes, 6, 64) == 64


@pytest.mark.slow
def test_one_bad_eval_image_does_not_cost_the_run_its_evaluation(data, tmp_path):
    """An oversized PNG (a decompression bomb to PIL) in the zero-shot folder: skipped and counted in the
    final evaluation; with eval.on_bad_image=error, a one-line error naming the file."""
    from evalgen import bomb_png, make_imagefolder

    folder = tmp_path / "zeroshot"
    make_imagefolder(folder, ["a", "b"], per_class=3, classnames=["apple", "bus"], replace={4: bomb_png()})
    base = {"data.workers": 1, "eval.workers": 2, "eval.zeroshot": f"[{folder}]", "train.max_steps": 2}
    run(data, tmp_path / "ok", **base)
    lines = [json.loads(x) for x in (tmp_path / "ok/metrics.jsonl").read_text().splitlines()]
    (final_eval,) = [x for x in lines if x.get("eval") == "zeroshot_classification"]
    assert final_eval["skipped_images"] == 1 and 0 <= final_eval["acc1"] <= 100
    proc = launch.run(["train", "--config", str(TINY)] + overrides(data, tmp_path / "strict", **base,
                                                                    **{"eval.on_bad_image": "error"}))
    assert_one_line_error(proc, str(folder / "b"), "DecompressionBomb")
