"""design.md §5.2 and §7.2 in the trainer: each process keeps and writes its shard of the per-sample state, and a run
saved by 2 processes resumes at 1 and at 4 with the numbers of the uninterrupted run."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from clip_dro.bench import launch
from clip_dro.checkpoint import read_loss_state, read_temperatures
from clip_dro.losses import ISogCLRLoss
from test_trainer import TINY, assert_same_checkpoint, overrides

# lanes = 4 is a multiple of 1, 2 and 4 processes; the global batch is 16 throughout
LAYOUT = {"data.lanes": 4, "data.workers": 1, "train.max_steps": 6, "train.checkpoint_every": 3}


def _args(data_dir, out, nproc: int, **extra) -> list[str]:
    return ["train", "--config", str(TINY)] + overrides(data_dir, out, **{**LAYOUT, "data.batch_size": 16 // nproc,
                                                                           **extra})


@pytest.fixture(scope="module")
def two_process_run(data, module_tmp):
    out = module_tmp("two") / "run"
    done = launch.run(_args(data, out, 2), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_process_writes_its_shard(two_process_run, data):
    final = two_process_run / "final"
    manifest = json.loads((data / "train/manifest.json").read_text())
    shards = [torch.load(final / f"loss_state/shard-{r:05d}-of-00002.pt") for r in range(2)]
    for rank, shard in enumerate(shards):
        assert shard["shard_layout"].tolist() == [rank, 2]
        assert shard["img.tau"].numel() == len(range(rank, manifest["num_images"], 2))
        assert shard["txt.tau"].numel() == len(range(rank, manifest["num_texts"], 2))
    whole = read_loss_state(final)
    assert whole["img.tau"].numel() == manifest["num_images"]
    for rank, shard in enumerate(shards):  # process r owns the ids r, r + 2, ...
        assert torch.equal(whole["img.tau"][rank::2], shard["img.tau"])
        temperatures = np.load(final / f"temperatures/shard-{rank:05d}-of-00002.npz")
        assert (temperatures["image_index"] % 2 == rank).all()
        assert np.array_equal(temperatures["image_tau"], shard["img.tau"].numpy())
    # the small set also gets temperatures.csv: the same rows as the shards
    from_shards = read_temperatures(final).sort_values(["side", "index"]).reset_index(drop=True)
    from_csv = read_temperatures(final / "temperatures.csv")
    pd.testing.assert_frame_equal(from_shards, from_csv, check_dtype=False)
    assert from_csv.tau.nunique() > 1


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_at_another_number_of_processes(two_process_run, data, tmp_path, nproc):
    """Saved at step 3 by 2 processes, resumed by `nproc`: re-sharded on load, same run (up to the summation
    order of DDP's all-reduce, as between 1 and 2 processes)."""
    done = launch.run(_args(data, tmp_path / "resumed", nproc,
                            **{"train.resume": str(two_process_run / "checkpoints/step-3")}), nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert_same_checkpoint(two_process_run / "final", tmp_path / "resumed/final", weights_atol=1e-4, state_atol=2e-5)
    written = sorted(p.name for p in (tmp_path / "resumed/final/loss_state").iterdir())
    assert written == [f"shard-{r:05d}-of-{nproc:05d}.pt" for r in range(nproc)]


def test_state_device_cpu_keeps_the_state_in_host_memory():
    loss = ISogCLRLoss(10, 12, state_device="cpu").to("meta")
    assert loss.sizes.device.type == "meta", "the rest of the loss moves"
    assert {b.device.type for name, b in loss.named_buffers() if name.startswith(("img.", "txt."))} == {"cpu"}
